"""mamba-ssm's CUDA selective scan behind the project's scan signature, for comparisons.

``models/vim.py`` calls :func:`mamba_ssm_scan` when a model is built with
``scan_backend="mamba_ssm"``; the benchmarks use it to time the official kernel on the same
inputs as ours. mamba-ssm has no reverse scan, so the backward direction flips the sequence,
scans and flips back (the extra copies are part of what that backend costs).
"""

from __future__ import annotations

import functools

from torch import Tensor

from mame_deploy.errors import UserError


@functools.lru_cache(maxsize=None)
def selective_scan_fn():
    """mamba-ssm's ``selective_scan_fn`` (UserError with the install hint where it is missing)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn
    except ImportError as exc:
        raise UserError(
            "scan_backend='mamba_ssm' needs mamba-ssm on a CUDA machine: pip install 'mame-deploy[gpu]' "
            f"({exc})"
        ) from exc
    return fn


def mamba_ssm_scan(x, delta, A, B, C, D, z, delta_bias, reverse: bool) -> Tensor:
    """Vim's scan (delta softplus on) through mamba-ssm; inputs as ``selective_scan_ref``."""
    fn = selective_scan_fn()
    if not reverse:
        return fn(x, delta, A, B, C, D, z, delta_bias, delta_softplus=True)
    flip = [None if t is None else t.flip(-1) for t in (x, delta, B, C, z)]
    out = fn(flip[0], flip[1], A, flip[2], flip[3], D, flip[4], delta_bias, delta_softplus=True)
    return out.flip(-1)
