"""``torch.ops.mame.token_merge``: the PyTorch op models call, and its ONNX node while exporting.

The reference is the op's CPU implementation (and its fallback); the CUDA kernel registers
itself for CUDA tensors (``cuda.py``). While ``torch.onnx.export`` runs, ``token_merge`` emits
one ``mame::TokenMerge`` node instead, whose ONNX function the exporter attaches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import ATTRIBUTES, ONNX_DOMAIN, ONNX_OP_TYPE, MergeAttributes, check_length
from .reference import token_merge_ref

Outputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("mame::token_merge", mutates_args=())
def _token_merge_op(hidden: Tensor, residual: Tensor, score: Tensor, score_b: Tensor, size: Tensor, origin: Tensor,
                    cls: Tensor, r: int, prune: int, split: int, arrangement: int, weighting: int, metric: int,
                    lam: float, score_scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    attrs = MergeAttributes(r, prune, split, arrangement, weighting, metric, lam, score_scale)
    return tuple(t.clone() if t is x else t for t, x in
                 zip(token_merge_ref(hidden, residual, score, score_b, size, origin, cls, attrs),
                     (hidden, residual, size, origin, cls)))


@_token_merge_op.register_fake
def _(hidden, residual, score, score_b, size, origin, cls, r, prune, split, arrangement, weighting, metric, lam,
      score_scale):
    B, L, E = hidden.shape
    out = L - r
    return (hidden.new_empty(B, out, E), residual.new_empty(B, out, E), size.new_empty(B, out),
            origin.new_empty(B, out), cls.new_empty(B))


def _onnx_node(hidden, residual, score, score_b, size, origin, cls, attrs: MergeAttributes) -> Outputs:
    """One mame::TokenMerge node; its ONNX function is attached by the exporter."""
    B, L, E = hidden.shape
    out = L - attrs.r
    return tuple(torch.onnx.ops.symbolic_multi_out(
        f"{ONNX_DOMAIN}::{ONNX_OP_TYPE}",
        (hidden, residual, score, score_b, size, origin, cls),
        attrs=attrs.as_dict(),
        dtypes=(hidden.dtype, residual.dtype, torch.float32, torch.int64, torch.int64),
        shapes=((B, out, E), (B, out, E), (B, out), (B, out), (B,)),
        version=1,
    ))


def token_merge(hidden: Tensor, residual: Tensor, score: Tensor, score_b: Tensor, size: Tensor, origin: Tensor,
                cls: Tensor, attrs: MergeAttributes) -> Outputs:
    """What the merge hook calls: the registered op, the reference while training (autograd
    runs through it), or a custom-domain node while exporting to ONNX."""
    check_length(hidden.shape[1], attrs.r)
    if torch.onnx.is_in_onnx_export():
        return _onnx_node(hidden, residual, score, score_b, size, origin, cls, attrs)
    if torch.is_grad_enabled() and (hidden.requires_grad or residual.requires_grad):
        return token_merge_ref(hidden, residual, score, score_b, size, origin, cls, attrs)
    values = attrs.as_dict()
    return torch.ops.mame.token_merge(hidden, residual, score, score_b, size, origin, cls,
                                      *(values[a] for a in ATTRIBUTES))
