"""The selective scan: the one operator that ONNX and TensorRT lack.

This module is its single PyTorch definition. ``selective_scan_ref`` is the reference
(float32 accumulation whatever the input dtype); it is registered as the custom op
``torch.ops.mame.selective_scan`` so the model calls one op whichever backend runs it (a CUDA
kernel registers itself for the CUDA dispatch key, see ``mame_deploy.kernels``). During ONNX
export, ``selective_scan`` emits one ``mame::SelectiveScan`` node instead.

Shapes (Vim's layout, as in mamba-ssm):
    u, delta, z: (batch, dim, length)      A: (dim, dstate)
    B, C: (batch, dstate, length)          D, delta_bias: (dim,)
Recurrence, per batch b, channel d, state n, step t (t runs backwards when ``reverse``):
    dt = softplus(delta + delta_bias)      h = exp(dt * A) * h + dt * B * u
    y = sum_n h * C + D * u                out = y * silu(z)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Name of the op in every face: torch.library ("mame::selective_scan") and ONNX ("mame",
# "SelectiveScan"); the TensorRT plugin registers "mame::SelectiveScan".
ONNX_DOMAIN = "mame"
ONNX_OP_TYPE = "SelectiveScan"
# Input order of the ONNX node and the TensorRT plugin (optional inputs are always present).
INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def discretize(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    """The scan's step size dt in float32, (batch, dim, length). Also MaMe's informativeness."""
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[None, :, None]
    return F.softplus(dt) if delta_softplus else dt


def selective_scan_ref(
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
) -> Tensor:
    """Reference scan, float32 state, result in u's dtype.

    The exponentials and input terms of all steps are computed at once; only the
    first-order recurrence h_t = a_t * h_{t-1} + b_t runs as a loop, one fused multiply-add
    per step, which keeps a vim_t forward on the CPU well under a second.
    """
    batch, dim, length = u.shape
    dstate = A.shape[1]
    u32 = u.float()
    dt = discretize(delta, delta_bias, delta_softplus)
    # (batch, length, dim, dstate): step-major so each step reads one contiguous slab.
    decay = torch.exp(dt.transpose(1, 2)[..., None] * A.float()[None, None])
    drive = (dt * u32).transpose(1, 2)[..., None] * B.float().transpose(1, 2)[:, :, None, :]
    # Per-step views in and a list out (no indexing into, or writes to, a big tensor per
    # step): autograd through this loop then costs O(L), not O(L^2) copies of the states.
    decays, drives, states = decay.unbind(1), drive.unbind(1), [None] * length
    h = torch.zeros(batch, dim, dstate, dtype=torch.float32, device=u.device)
    steps = range(length - 1, -1, -1) if reverse else range(length)
    for t in steps:
        h = torch.addcmul(drives[t], decays[t], h)
        states[t] = h
    y = torch.einsum("bldn,bnl->bdl", torch.stack(states, dim=1), C.float())
    if D is not None:
        y = y + D.float()[None, :, None] * u32
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


# ---------------------------------------------------------------------------------------------
# torch.library registration: one op, the reference as its CPU (and fallback) implementation.

@torch.library.custom_op("mame::selective_scan", mutates_args=())
def _selective_scan_op(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    reverse: bool,
) -> Tensor:
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)


@_selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    return torch.empty_like(u)


def _onnx_node(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    """One mame::SelectiveScan node; the ONNX function body is attached by the exporter."""
    dim = u.shape[1]
    if D is None:
        D = torch.zeros(dim, dtype=torch.float32, device=u.device)
    if z is None:
        raise ValueError("the ONNX SelectiveScan node needs the gate z")
    if delta_bias is None:
        delta_bias = torch.zeros(dim, dtype=torch.float32, device=u.device)
    return torch.onnx.ops.symbolic(
        f"{ONNX_DOMAIN}::{ONNX_OP_TYPE}",
        (u, delta, A, B, C, D, z, delta_bias),
        attrs={"delta_softplus": int(delta_softplus), "reverse": int(reverse)},
        dtype=u.dtype,
        shape=u.shape,
        version=1,
    )


def selective_scan(
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
) -> Tensor:
    """What models call: the registered op, or a custom-domain node while exporting to ONNX."""
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    if torch.onnx.is_in_onnx_export():
        return _onnx_node(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:8]):
        return selective_scan_ref(*args)  # training: autograd runs through the reference
    return torch.ops.mame.selective_scan(*args)

if torch.backends.cuda.is_built():  # CUDA builds of torch: our kernel serves the op on GPUs
    from mame_deploy import kernels as _kernels  # noqa: E402,F401  (lazy: touches no GPU here)
