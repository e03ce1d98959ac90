"""What both TensorRT plugins (``trt_plugin`` for the scan, ``trt_token_merge`` for the merge
step) share: importing TensorRT with a clear error, the description of one AOT kernel, reading
static sizes off shape expressions, handing a kernel to TensorRT as ``aot_impl`` returns it, and
binding a plugin once.

No ``from __future__ import annotations`` (``tensorrt.plugin`` inspects annotations as classes).
"""

import threading
from dataclasses import dataclass
from typing import Any, Callable, Tuple

from mame_deploy.errors import UserError

TRT_INSTALL_HINT = "install it with pip install 'mame-deploy[trt]' on a machine with an NVIDIA GPU"


def tensorrt_available() -> bool:
    """Whether ``import tensorrt`` works here."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):  # OSError: bindings present without libnvinfer
        return False
    return True


def require_tensorrt(feature: str = "this command"):
    """``import tensorrt``, or a UserError naming the ``trt`` extra."""
    try:
        import tensorrt
    except (ImportError, OSError):  # OSError: Python bindings present without libnvinfer
        raise UserError(f"TensorRT is needed for {feature}; {TRT_INSTALL_HINT}") from None
    return tensorrt


@dataclass(frozen=True)
class AotKernel:
    """Everything a plugin gives TensorRT for one node. ``grid``/``block`` are (x, y, z); they,
    ``shared_mem`` and ``scalars`` are ints or, inside TensorRT, shape expressions."""

    name: str
    ptx: bytes
    grid: Tuple[Any, Any, Any]
    block: Tuple[Any, Any, Any]
    shared_mem: Any
    scalars: Tuple[Any, ...]


def static_dim(expr):
    """A shape expression as an int where TensorRT knows its value at build time."""
    return int(expr.constant_value()) if expr.is_constant else expr


def constant_dim(expr, op: str, what: str) -> int:
    """A size that must be static (only the batch axis may be dynamic), as an int."""
    if isinstance(expr, int):
        return expr
    if expr.is_constant:
        return int(expr.constant_value())
    raise UserError(f"{op} needs a static {what}; only the batch axis may be dynamic")


def aot_result(trtp, kernel: AotKernel):
    """``aot_impl``'s return value for ``kernel``: name, PTX, launch parameters, scalars."""
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = kernel.grid
    params.block_x, params.block_y, params.block_z = kernel.block
    params.shared_mem = kernel.shared_mem
    # Every scalar must be a SymInt32: TensorRT rejects plain SymIntExprs (e.g. from ints).
    scalars = trtp.SymIntExprs(len(kernel.scalars))
    for i, value in enumerate(kernel.scalars):
        scalars[i] = trtp.SymInt32(value)
    return kernel.name, kernel.ptx, params, scalars


class Registration:
    """Binds one plugin's implementations to TensorRT once per process: the AOT one on the first
    ``register``, the Python (JIT) one the first time ``jit=True`` is asked for."""

    def __init__(self, bind_aot: Callable[[], None], bind_jit: Callable[[], None]):
        self._bind_aot, self._bind_jit = bind_aot, bind_jit
        self._lock = threading.Lock()
        self._aot = self._jit = False

    def register(self, jit: bool = False) -> None:
        with self._lock:
            if not self._aot:
                self._bind_aot()
                self._aot = True
            if jit and not self._jit:
                self._bind_jit()
                self._jit = True
