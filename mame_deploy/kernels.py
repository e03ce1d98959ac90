"""The selective-scan CUDA kernel on PyTorch tensors, and its registration as the CUDA
implementation of ``torch.ops.mame.selective_scan``.

The kernel is ``plugins/selective_scan.cu``, compiled to PTX by ``mame_deploy.plugins.launch``
(the same function the TensorRT plugin calls), loaded with the CUDA driver API (cuda-python) and
launched on PyTorch's current stream with ``launch.launch_params`` -- so CUDA graphs capture it.
Nothing here touches CUDA or imports cuda-python until a CUDA tensor reaches the op: importing
this module on a machine without either is fine.
"""

from __future__ import annotations

import ctypes
import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from mame_deploy.errors import UserError
from mame_deploy.ops import cuda_driver
from mame_deploy.ops.selective_scan import selective_scan_ref
from mame_deploy.plugins import launch

TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# Grid y is the channel-group count; CUDA caps it at 65535.
_MAX_GRID_Y = 65535


# The driver helpers live in mame_deploy.ops.cuda_driver (shared with the token-merge kernel);
# these names stay for the scan's callers and tests.
_driver = cuda_driver.driver
_check = cuda_driver.check
_Loaded = cuda_driver.Loaded


def _kernel(device: torch.device, dtype: str, dstate: int, softplus: bool, reverse: bool, tuning) -> _Loaded:
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
    expected = {
        "delta": (delta, (batch, dim, length)), "B": (B, (batch, dstate, length)),
        "C": (C, (batch, dstate, length)), "z": (z, (batch, dim, length)),
        "D": (D, (dim,)), "delta_bias": (delta_bias, (dim,)),
    }
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise UserError(f"selective scan: {name} must have shape {shape}, got {tuple(t.shape)}")
    for name, t in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), (u, delta, A, B, C, D, z, delta_bias)):
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
) -> Tensor:
    """The forward scan on the GPU; same arguments and result as ``selective_scan_ref``.

    u, delta, B, C, z are used in u's dtype (float32, float16 or bfloat16), A, D, delta_bias in
    float32; non-contiguous inputs are copied. ``out`` (contiguous, u's shape and dtype) receives
    the result if given. ``tuning`` (the kernel's work split) defaults to
    ``launch.tuning_for(batch, dim, length)``.
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
    if out is None:
        out = torch.empty_like(u)
    elif out.shape != u.shape or out.dtype != u.dtype or out.device != u.device or not out.is_contiguous():
        raise UserError(f"out must be a contiguous {u.dtype} tensor of shape {tuple(u.shape)} on {u.device}")
    if u.numel() == 0:
        return out

    kernel = _kernel(u.device, dtype, dstate, bool(delta_softplus), bool(reverse), tuning)
    tensors = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias, "out": out}
    values = {name: (0 if t is None else t.data_ptr()) for name, t in tensors.items()}
    values.update(batch=batch, dim=dim, length=length)
    holders, array = pack_args(values)
    stream = torch.cuda.current_stream(u.device).cuda_stream
    cuda_driver.launch(kernel, params.grid, params.block, params.shared_mem, stream, array,
                       "launching the selective-scan kernel")
    return out


def kernel_supports(dstate: int) -> bool:
    return dstate in launch.DSTATES


_warned: set = set()


def _fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"mame::selective_scan runs the PyTorch reference on the GPU: {reason}", stacklevel=3)


@torch.library.register_kernel("mame::selective_scan", "cuda")
def _selective_scan_cuda_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    if u.dtype not in TORCH_DTYPES:
        _fallback(f"no kernel for {u.dtype}")
        return selective_scan_ref(*args)
    if not kernel_supports(A.shape[1]):
        _fallback(f"no kernel for d_state {A.shape[1]} (it has {', '.join(map(str, launch.DSTATES))})")
        return selective_scan_ref(*args)
    try:
        _driver()
    except UserError as exc:
        _fallback(str(exc))
        return selective_scan_ref(*args)
    return selective_scan_cuda(*args)


# ---------------------------------------------------------------------------------------------
# Inputs and error metric shared by the GPU tests and the benchmarks.

def scan_inputs(
    batch: int, dim: int, length: int, dstate: int = 16, dtype: torch.dtype = torch.float32,
    softplus: bool = True, seed: int = 0, device="cuda",
) -> dict:
    """Random scan arguments (keyword names of ``selective_scan_ref``) with Vim-like magnitudes:
    A = -exp(.) in [-16, -1], step sizes dt in [1e-3, 0.1] (delta_bias = inverse softplus, as
    Vim's dt_proj.bias), unit-scale activations; u, delta, B, C, z in ``dtype``."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    def rand(*shape):
        return torch.rand(*shape, generator=g, device=device)

    A = -torch.exp(rand(dim, dstate) * math.log(16.0))
    if softplus:
        dt = torch.exp(rand(dim) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        delta_bias = dt + torch.log(-torch.expm1(-dt))
        delta = 0.5 * randn(batch, dim, length)
    else:  # dt = delta + delta_bias must stay positive
        delta_bias = torch.full((dim,), 1e-3, device=device)
        delta = 0.1 * rand(batch, dim, length)
    args = dict(
        u=randn(batch, dim, length), delta=delta, A=A, B=randn(batch, dstate, length),
        C=randn(batch, dstate, length), D=randn(dim), z=randn(batch, dim, length), delta_bias=delta_bias,
    )
    for name in ("u", "delta", "B", "C", "z"):
        args[name] = args[name].to(dtype)
    return args


def relative_error(out: Tensor, ref: Tensor) -> float:
    """Norm-wise ||out - ref|| / ||ref||, in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()
