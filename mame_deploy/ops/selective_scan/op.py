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

from .contract import ATTRIBUTES, DT_SUMS_NAME, FUNCTION_VERSION, OUTPUT_NAME, PLUGIN_ID, TORCH_NAME, output_shapes
from .reference import scan_ref_outputs


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
) -> tuple[Tensor, Tensor]:
    return scan_ref_outputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)


@_selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    # Fresh contiguous tensors, as every implementation returns (u itself may be a strided view).
    shapes = output_shapes(*u.shape)
    return u.new_empty(shapes[OUTPUT_NAME]), u.new_empty(shapes[DT_SUMS_NAME], dtype=torch.float32)


def _onnx_node(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    """One mame::SelectiveScan node; the ONNX function body is attached by the exporter."""
    dim = u.shape[1]
    if D is None:
        D = torch.zeros(dim, dtype=torch.float32, device=u.device)
    if z is None:
        raise ValueError("the ONNX SelectiveScan node needs the gate z")
    if delta_bias is None:
        delta_bias = torch.zeros(dim, dtype=torch.float32, device=u.device)
    out, dt_sums = torch.onnx.ops.symbolic_multi_out(
        PLUGIN_ID,
        (u, delta, A, B, C, D, z, delta_bias),
        attrs=dict(zip(ATTRIBUTES, (int(delta_softplus), int(reverse)))),
        dtypes=(u.dtype, torch.float32),
        shapes=tuple(output_shapes(*u.shape).values()),
        version=FUNCTION_VERSION,
    )
    return out, dt_sums


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
) -> tuple[Tensor, Tensor]:
    """What models call: the registered op, or a custom-domain node while exporting to ONNX.
    Returns ``(out, dt_sums)`` (contract.py)."""
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    if torch.onnx.is_in_onnx_export():
        return _onnx_node(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:8]):
        return scan_ref_outputs(*args)  # training: autograd runs through the reference
    return torch.ops.mame.selective_scan(*args)
