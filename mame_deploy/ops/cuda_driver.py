"""The CUDA driver (cuda-python) for the kernel launchers of ``mame_deploy``: checked calls,
modules loaded into PyTorch's context once per device, kernel arguments packed for
``cuLaunchKernel``, and the launch on PyTorch's current stream (so CUDA graphs capture it).

Used by the selective scan (``mame_deploy.ops.selective_scan.cuda``) and the token merge
(``mame_deploy.ops.token_merge.cuda``). Nothing imports cuda-python until a kernel runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import Callable, Mapping, Optional, Sequence

from mame_deploy.errors import UserError


def driver():
    try:
        from cuda.bindings import driver as cuda_driver
    except ImportError as exc:
        raise UserError(
            "the CUDA kernels need cuda-python; install it with pip install 'mame-deploy[gpu]'"
        ) from exc
    return cuda_driver


def check(result, what: str):
    """cuda-python returns (CUresult, *values): raise on an error, else return the values."""
    drv = driver()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != drv.CUresult.CUDA_SUCCESS:
        _, name = drv.cuGetErrorName(err)
        raise RuntimeError(f"{what} failed: {name.decode() if isinstance(name, bytes) else err}")
    return values[0] if len(values) == 1 else values


@contextlib.contextmanager
def current(context):
    """``context`` made the calling thread's current one for the block, the previous one after."""
    check(driver().cuCtxPushCurrent(context), "cuCtxPushCurrent")
    try:
        yield
    finally:
        check(driver().cuCtxPopCurrent(), "cuCtxPopCurrent")


class Loaded:
    """One compiled kernel on one device: its module (kept alive), function and context."""

    def __init__(self, device_index: int, ptx: bytes, name: str):
        drv = driver()
        check(drv.cuInit(0), "cuInit")
        dev = check(drv.cuDeviceGet(device_index), "cuDeviceGet")
        # PyTorch runs in the device's primary context; the module must live there too.
        self.context = check(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        with current(self.context):
            self.module = check(drv.cuModuleLoadData(ptx + b"\0"), "loading the kernel's PTX")
            self.function = check(drv.cuModuleGetFunction(self.module, name.encode()), "cuModuleGetFunction")


_lock = threading.Lock()
_loaded: dict = {}


def load(key, device_index: int, compile_fn: Callable[[], tuple[bytes, str]],
         prepare: Optional[Callable[[Loaded], None]] = None) -> Loaded:
    """The kernel cached under ``key`` (per process; include the device in it), compiled by
    ``compile_fn() -> (ptx, name)`` and loaded on first use; ``prepare(kernel)`` then runs once
    (e.g. function attributes), before any thread can launch it."""
    found = _loaded.get(key)
    if found is None:
        with _lock:
            found = _loaded.get(key)
            if found is None:
                ptx, name = compile_fn()
                found = Loaded(device_index, ptx, name)
                if prepare is not None:
                    prepare(found)
                _loaded[key] = found
    return found


def allow_large_clusters(kernel: Loaded) -> None:
    """Let ``kernel`` (compiled with a cluster of more than 8 blocks) launch: such clusters are
    "non-portable" and refused unless the function says it may use them."""
    drv = driver()
    attribute = drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED
    with current(kernel.context):
        check(drv.cuFuncSetAttribute(kernel.function, attribute, 1), "allowing a cluster of more than 8 blocks")


def max_active_clusters(kernel: Loaded, cluster: int, block, shared_mem: int) -> int:
    """How many of ``kernel``'s (compile-time) clusters of ``cluster`` blocks the device can run at
    once; 0 where one cannot be placed (e.g. a GPU partition with fewer SMs per GPC)."""
    drv = driver()
    config = drv.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = cluster, 1, 1
    config.blockDimX, config.blockDimY, config.blockDimZ = block
    config.sharedMemBytes = shared_mem
    config.numAttrs = 0
    with current(kernel.context):
        err, count = drv.cuOccupancyMaxActiveClusters(kernel.function, config)
    return count if err == drv.CUresult.CUDA_SUCCESS else 0


def pack_args(values: Mapping[str, int], names: Sequence[str], types: Mapping[str, str]) -> tuple[list, ctypes.Array]:
    """cuLaunchKernel's ``kernelParams``: an array of pointers to each argument's value, in
    ``names`` order (``types[name] == "int32"``: an int32 scalar; anything else: a device
    address). Returns the value holders too: they must outlive the launch call."""
    missing = [name for name in names if name not in values]
    if missing:
        raise ValueError(f"kernel arguments missing: {missing}")
    holders = [
        ctypes.c_int32(values[name]) if types[name] == "int32" else ctypes.c_void_p(values[name]) for name in names
    ]
    array = (ctypes.c_void_p * len(holders))(*(ctypes.addressof(h) for h in holders))
    return holders, array


def launch(kernel: Loaded, grid, block, shared_mem: int, stream: int, args: ctypes.Array, what: str) -> None:
    """``cuLaunchKernel`` on ``stream`` (PyTorch's ``cuda_stream`` handle), in the kernel's context."""
    drv = driver()
    if check(drv.cuCtxGetCurrent(), "cuCtxGetCurrent") != kernel.context:
        check(drv.cuCtxSetCurrent(kernel.context), "cuCtxSetCurrent")
    check(drv.cuLaunchKernel(kernel.function, *grid, *block, shared_mem, stream, ctypes.addressof(args), 0), what)
