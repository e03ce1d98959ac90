"""The reference of ``mame::SelectiveScan``: the scan in PyTorch (contract.py says what it is).

This is the operator's definition. The CUDA kernel, the ONNX function body and the tests are
checked against it; training runs through it (autograd). It accumulates in float32 whatever the
input dtype and returns u's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .contract import DT_GROUP


def discretize(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    """The scan's step size dt in float32, (batch, dim, length). Also MaMe's informativeness."""
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[None, :, None]
    return F.softplus(dt) if delta_softplus else dt


def dt_group_sums(dt: Tensor) -> Tensor:
    """``dt`` (batch, dim, length) summed over groups of DT_GROUP consecutive channels:
    (batch, ceil(dim / DT_GROUP), length) float32, the scan's second output."""
    batch, dim, length = dt.shape
    pad = -dim % DT_GROUP
    dt = F.pad(dt.float(), (0, 0, 0, pad)) if pad else dt.float()
    return dt.view(batch, (dim + pad) // DT_GROUP, DT_GROUP, length).sum(dim=2)


def scan_dt_sums(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    """The scan's ``dt_sums`` output from its inputs (what the op returns beside ``out``)."""
    return dt_group_sums(discretize(delta, delta_bias, delta_softplus))


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
    return _scan_from_dt(u, discretize(delta, delta_bias, delta_softplus), A, B, C, D, z, reverse)


def _scan_from_dt(u, dt, A, B, C, D, z, reverse) -> Tensor:
    """The scan given its float32 step sizes ``dt`` (what selective_scan_ref computes first)."""
    batch, dim, length = u.shape
    dstate = A.shape[1]
    u32 = u.float()
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


def scan_ref_outputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False):
    """Both outputs of the operator from the reference: ``(out, dt_sums)``, contiguous as the
    op's fake and CUDA implementations return them (torch.compile checks the strides). dt is
    computed once for both."""
    dt = discretize(delta, delta_bias, delta_softplus)
    out = _scan_from_dt(u, dt, A, B, C, D, z, reverse)
    return out.contiguous(), dt_group_sums(dt)
