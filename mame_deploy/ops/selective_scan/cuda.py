"""The CUDA face of ``mame::SelectiveScan``: the kernel on PyTorch tensors, and its registration
as the CUDA implementation of ``torch.ops.mame.selective_scan``.

The kernel is ``plugins/selective_scan.cu``, compiled to PTX by ``mame_deploy.plugins.launch``
(the same function the TensorRT plugin calls), loaded with the CUDA driver API (cuda-python) and
launched on PyTorch's current stream with ``launch.launch_params`` -- so CUDA graphs capture it.
Importing this module touches neither CUDA nor cuda-python; nothing is registered until
:func:`register_cuda` is called (the package's ``__init__`` does, after defining the op).
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

from mame_deploy.errors import UserError
from mame_deploy.ops import cuda_driver
from mame_deploy.plugins import launch

from .contract import DT_SUMS_NAME, INPUT_NAMES, TORCH_NAME, input_shapes, output_shapes
from .reference import scan_ref_outputs

TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# Grid y is the channel-group count; CUDA caps it at 65535.
_MAX_GRID_Y = 65535


def _kernel(device: torch.device, dtype: str, dstate: int, softplus: bool, reverse: bool, tuning) -> cuda_driver.Loaded:
    def compile_variant():
        major, minor = torch.cuda.get_device_capability(device)
        return launch.compile_ptx(dtype, dstate, softplus, reverse, f"sm_{major}{minor}", tuning)

    key = ("selective_scan", device.index, dtype, dstate, softplus, reverse, tuning)
    return cuda_driver.load(key, device.index, compile_variant)


def pack_args(values: dict) -> tuple[list, ctypes.Array]:
    """cuLaunchKernel's ``kernelParams`` in ``launch.KERNEL_ARGS`` order (tensors as device
    addresses, scalars as int32); the holders must outlive the launch call."""
    return cuda_driver.pack_args(values, launch.KERNEL_ARGS, launch.KERNEL_ARG_TYPES)


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> tuple[int, int, int, int]:
    if u.dim() != 3:
        raise UserError(f"selective scan: u must be (batch, dim, length), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise UserError(f"selective scan: A must be (dim={dim}, dstate), got {tuple(A.shape)}")
    dstate = A.shape[1]
    tensors = dict(zip(INPUT_NAMES, (u, delta, A, B, C, D, z, delta_bias)))
    for name, shape in input_shapes(batch, dim, length, dstate).items():
        t = tensors[name]
        if t is not None and tuple(t.shape) != shape:
            raise UserError(f"selective scan: {name} must have shape {shape}, got {tuple(t.shape)}")
    for name, t in tensors.items():
        if t is not None and t.device != u.device:
            raise UserError(f"selective scan: {name} is on {t.device}, u on {u.device}; move them to one GPU")
    return batch, dim, length, dstate


def selective_scan_cuda(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    reverse: bool = False,
    out: Optional[Tensor] = None,
    tuning: Optional[launch.Tuning] = None,
    dt_sums: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """The forward scan on the GPU: ``(out, dt_sums)``, as ``reference.scan_ref_outputs``.

    u, delta, B, C, z are used in u's dtype (float32, float16 or bfloat16), A, D, delta_bias in
    float32; non-contiguous inputs are copied. ``out`` (contiguous, u's shape and dtype) and
    ``dt_sums`` (contiguous float32) receive the results if given. ``tuning`` (the kernel's work
    split) defaults to ``launch.tuning_for(batch, dim, length)``.
    """
    batch, dim, length, dstate = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if not u.is_cuda:
        raise UserError("selective_scan_cuda needs CUDA tensors; the CPU runs selective_scan_ref")
    dtype = TORCH_DTYPES.get(u.dtype)
    if dtype is None:
        raise UserError(f"the selective-scan kernel has no {u.dtype} variant; use float32, float16 or bfloat16")
    tuning = tuning or launch.tuning_for(batch, dim, length)
    params = launch.launch_params(batch, dim, length, dstate, dtype, tuning)
    if params.grid[1] > _MAX_GRID_Y:
        raise UserError(f"dim {dim} is too large for one launch (at most {_MAX_GRID_Y * tuning.channels})")

    def prepare(t, dt):
        return None if t is None else t.to(dt).contiguous()

    u, delta, B, C, z = (prepare(t, u.dtype) for t in (u, delta, B, C, z))
    A, D, delta_bias = (prepare(t, torch.float32) for t in (A, D, delta_bias))
    out = _output(out, "out", u.shape, u.dtype, u.device)
    dt_sums = _output(dt_sums, DT_SUMS_NAME, output_shapes(batch, dim, length)[DT_SUMS_NAME], torch.float32, u.device)
    if u.numel() == 0:
        return out, dt_sums

    kernel = _kernel(u.device, dtype, dstate, bool(delta_softplus), bool(reverse), tuning)
    tensors = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias,
               "out": out, DT_SUMS_NAME: dt_sums}
    values = {name: (0 if t is None else t.data_ptr()) for name, t in tensors.items()}
    values.update(batch=batch, dim=dim, length=length)
    holders, array = pack_args(values)
    stream = torch.cuda.current_stream(u.device).cuda_stream
    cuda_driver.launch(kernel, params.grid, params.block, params.shared_mem, stream, array,
                       "launching the selective-scan kernel")
    return out, dt_sums


def _output(given: Optional[Tensor], name: str, shape, dtype, device) -> Tensor:
    """A new output tensor, or ``given`` once checked to be one (contiguous, shape, dtype, device)."""
    shape = tuple(shape)
    if given is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(given.shape) != shape or given.dtype != dtype or given.device != device or not given.is_contiguous():
        raise UserError(f"{name} must be a contiguous {dtype} tensor of shape {shape} on {device}")
    return given


def kernel_supports(dstate: int) -> bool:
    return dstate in launch.DSTATES


_warned: set = set()


def _fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"mame::selective_scan runs the PyTorch reference on the GPU: {reason}", stacklevel=3)


def _selective_scan_cuda_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    if u.dtype not in TORCH_DTYPES:
        _fallback(f"no kernel for {u.dtype}")
        return scan_ref_outputs(*args)
    if not kernel_supports(A.shape[1]):
        _fallback(f"no kernel for d_state {A.shape[1]} (it has {', '.join(map(str, launch.DSTATES))})")
        return scan_ref_outputs(*args)
    try:
        cuda_driver.driver()
    except UserError as exc:
        _fallback(str(exc))
        return scan_ref_outputs(*args)
    return selective_scan_cuda(*args)


_lock = threading.Lock()
_registered = False


def register_cuda() -> None:
    """Make the kernel the CUDA implementation of ``torch.ops.mame.selective_scan`` (idempotent).
    The op (``op.py``) must be defined first; inputs the kernel cannot run fall back to the
    reference with a one-time warning."""
    global _registered
    with _lock:
        if not _registered:
            torch.library.register_kernel(TORCH_NAME, "cuda")(_selective_scan_cuda_op)
            _registered = True
