"""``torch.ops.mame.selective_scan``: the PyTorch op models call, and its ONNX node while exporting.

The reference is the op's CPU implementation (and its fallback); the CUDA kernel registers
itself for CUDA tensors (``cuda.py``, registered by the package's ``__init__``). While
``torch.onnx.export`` runs, ``selective_scan`` emits one ``mame::SelectiveScan`` node instead,
whose ONNX function the exporter attaches.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .contract import ATTRIBUTES, FUNCTION_VERSION, PLUGIN_ID, TORCH_NAME
from .reference import selective_scan_ref


# One op, the reference as its CPU (and fallback) implementation.
@torch.library.custom_op(TORCH_NAME, mutates_args=())
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
        PLUGIN_ID,
        (u, delta, A, B, C, D, z, delta_bias),
        attrs=dict(zip(ATTRIBUTES, (int(delta_softplus), int(reverse)))),
        dtype=u.dtype,
        shape=u.shape,
        version=FUNCTION_VERSION,
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
