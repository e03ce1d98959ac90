"""Random operator inputs with Vim-like magnitudes, the error metric and bit equality, shared by the GPU tests
and the benchmarks of both operators (``selective_scan``, ``token_merge``)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

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


def same_bits(got, want) -> bool:
    """Whether two sequences of tensors are equal bit for bit (floats compared as raw bytes, so
    NaN patterns and signed zeros count; sequences of different lengths differ): how work splits of
    one kernel are compared."""
    def raw(t):
        return t.view(torch.uint8) if t.is_floating_point() else t

    got, want = tuple(got), tuple(want)
    return len(got) == len(want) and all(torch.equal(raw(x), raw(y)) for x, y in zip(got, want))


SCORE_PARTS = 192  # vim_s: two scans' dt_sums of 768 / 8 channel groups each


def merge_inputs(batch: int, length: int = 197, dim: int = 384, hidden_dtype: torch.dtype = torch.float32,
                 residual_dtype: Optional[torch.dtype] = None, seed: int = 0, device="cuda",
                 merged_before: bool = True, parts: int = SCORE_PARTS) -> dict:
    """Random arguments of ``token_merge_ref`` with vim_s-like magnitudes (keyword names): unit
    hidden, a residual stream ten times larger, the score as ``parts`` sums of 8 step sizes
    around a per-token mean step size (softplus range 0.001..0.1), split between ``score`` and
    ``score_b`` as two scans' (the first gets the odd one; one part: ``score_b`` is a part of
    zeros), and with ``merged_before`` the state of an earlier merge: sizes 1..4, origins a
    permutation, the class token anywhere."""
    g = torch.Generator(device=device).manual_seed(seed)
    residual_dtype = residual_dtype or hidden_dtype
    hidden = torch.randn(batch, length, dim, generator=g, device=device).to(hidden_dtype)
    residual = (10 * torch.randn(batch, length, dim, generator=g, device=device)).to(residual_dtype)
    mean_step = torch.exp(torch.rand(batch, 1, length, generator=g, device=device) * 4.6 - 6.9)
    score = 8 * mean_step * torch.exp(0.5 * torch.randn(batch, parts, length, generator=g, device=device))
    first = parts - parts // 2
    score, score_b = score[:, :first].contiguous(), score[:, first:].contiguous()
    if score_b.shape[1] == 0:
        score_b = torch.zeros_like(score[:, :1])
    if merged_before:
        size = torch.randint(1, 5, (batch, length), generator=g, device=device).float()
        origin = torch.argsort(torch.rand(batch, length, generator=g, device=device), dim=1)
        cls = torch.randint(0, length, (batch,), generator=g, device=device)
    else:
        size = torch.ones(batch, length, device=device)
        origin = torch.arange(length, device=device).expand(batch, length).contiguous()
        cls = torch.full((batch,), length // 2, device=device, dtype=torch.long)
    return dict(hidden=hidden, residual=residual, score=score, score_b=score_b, size=size, origin=origin, cls=cls)
