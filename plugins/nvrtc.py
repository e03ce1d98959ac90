"""NVRTC, shared by the CUDA kernels of ``plugins/``: one source file plus -D options -> PTX.

Both kernels (``selective_scan.cu`` through ``launch``, ``token_merge.cu`` through
``merge_launch``) compile here, for the PyTorch launchers and the TensorRT plugins alike. The PTX
carries the ISA version of the NVRTC that made it (``.version 9.0`` from NVRTC 13.0): a driver
loads PTX of at most the ISA its own CUDA version knows, so deploy with a driver at least as new
as the cuda-python/NVRTC that built the engine (CUDA 13.0: driver r580 or newer).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Optional, Sequence

from mame_deploy.errors import UserError


def nvrtc_module():
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise UserError(
            "compiling the CUDA kernels needs cuda-python and NVRTC; install them with pip install 'mame-deploy[gpu]'"
        ) from exc
    return nvrtc


def _check(nvrtc, result, what: str, prog=None) -> None:
    err = result[0] if isinstance(result, tuple) else result
    if err == nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return
    log = ""
    if prog is not None:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        buf = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, buf)
        log = buf.decode(errors="replace").strip()
    raise RuntimeError(f"NVRTC {what} failed ({err}){': ' + log if log else ''}")


def current_arch() -> str:
    """``compute_XY`` of the current CUDA device (device 0 if none is current)."""
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        raise UserError("finding the GPU's architecture needs cuda-python: pip install 'mame-deploy[gpu]'") from exc
    try:
        (err,) = driver.cuInit(0)
    except RuntimeError:  # cuda-python without libcuda: a machine with no NVIDIA driver
        err = None
    if err != driver.CUresult.CUDA_SUCCESS:
        raise UserError(f"no usable CUDA driver or GPU ({err}); pass arch='sm_90' to compile without one")
    err, dev = driver.cuCtxGetDevice()
    if err != driver.CUresult.CUDA_SUCCESS:
        err, dev = driver.cuDeviceGet(0)
    attr = driver.CUdevice_attribute
    _, major = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    _, minor = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    return f"compute_{major}{minor}"


def ptx_arch(arch: Optional[str]) -> str:
    """Accepts ``sm_90``, ``compute_90``, ``sm_90a`` or None (the current device)."""
    if arch is None:
        return current_arch()
    match = re.fullmatch(r"(?:sm_|compute_)?(\d{2,3}a?)", arch)
    if not match:
        raise UserError(f"unrecognised GPU architecture {arch!r}; write it like 'sm_90'")
    return f"compute_{match.group(1)}"


def ptx_version(ptx: bytes) -> str:
    """The PTX ISA version a module declares (``.version X.Y``)."""
    match = re.search(rb"^\s*\.version\s+(\d+\.\d+)", ptx, re.M)
    return match.group(1).decode() if match else "unknown"


@functools.lru_cache(maxsize=None)
def compile_ptx(source: Path, options: Sequence[str], arch: str) -> bytes:
    """PTX of ``source`` compiled with ``options`` (a tuple: cached per process) for ``arch``
    (``compute_XY``, see :func:`ptx_arch`)."""
    nvrtc = nvrtc_module()
    text = Path(source).read_bytes()
    err, prog = nvrtc.nvrtcCreateProgram(text, Path(source).name.encode(), 0, [], [])
    _check(nvrtc, err, "program creation")
    try:
        # -default-device: NVRTC treats the kernels' lambdas as host code without it (nvcc
        # derives their execution space from the enclosing kernel).
        opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-default-device"]
        opts += [o.encode() for o in options]
        _check(nvrtc, nvrtc.nvrtcCompileProgram(prog, len(opts), opts), "compilation", prog)
        err, size = nvrtc.nvrtcGetPTXSize(prog)
        _check(nvrtc, err, "PTX size")
        ptx = b" " * size
        _check(nvrtc, nvrtc.nvrtcGetPTX(prog, ptx), "PTX retrieval")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return ptx.rstrip(b"\0")
