"""The contract of ``mame::TokenMerge``: one whole MaMe / ToMe / pruning step as one operator.

Every face reads this file and nothing restates it: the PyTorch op (``torch.ops.mame.token_merge``),
the ONNX node and its function body, the CUDA kernel's launcher and the TensorRT plugin.

Inputs, in order (B batch, L tokens with the class token, E channels):
    hidden   (B, L, E)  T: float32 / float16 / bfloat16   the block's mixer output
    residual (B, L, E)  T2: float32 or T                  the residual stream
    score    (B, K, L)  float32                           informativeness as K partial sums (see below)
    score_b  (B, K2, L) float32                           K2 more of them (Vim: the backward scan's)
    size     (B, L)     float32                           original patches each token stands for
    origin   (B, L)     int64                             original position of each token
    cls      (B,)       int64                             where the class token is
Outputs, in order: hidden, residual (B, L - r, E), size, origin (B, L - r), cls (B,).

Attributes (integers, so that every runtime carries them alike, and two floats): ``r``
tokens removed, ``prune`` (1: drop the r least informative tokens, no matching), and the
switches of ``mame_deploy.merge.MergeOptions`` as codes: ``split`` (0 informativeness, 1
alternate), ``arrangement`` (0 ordered, 1 concat), ``weighting`` (0 informativeness, 1 size),
``metric`` (0 hidden, 1 residual + hidden), ``lam``; ``score_scale``.

The informativeness of token l is ``score_scale`` x the sum of the K + K2 parts of token l,
``score`` then ``score_b`` along the parts (their concatenation), added in one fixed order
(``SCORE_LANES`` lane sums of every SCORE_LANES-th part, then the lanes pairwise;
``reference.informativeness``), so the kernel and the reference get the same bits and no decision
flips between them on the score's rounding. Vim passes its two scans' dt_sums (groups of
channels) as the two inputs, with the scale 0.5 / d_inner: the mean step size, summed by the
operator instead of by separate kernels, and not concatenated first (a copy per merge block). A
caller with a finished (B, L) score passes it as (B, 1, L) with a (B, 1, L) of zeros and scale 1.

Decisions (which tokens are sources, where each goes, which merge) are made on keys rounded to
float16 (round to nearest even), with equal keys ordered by position, in every face alike:
rounding differences between runtimes then flip a decision only where two keys straddle a
float16 rounding boundary, and exact or near-exact ties (duplicate tokens) resolve the same way
everywhere. See ``mame_deploy/ops/token_merge/reference.py`` and docs/merging.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TORCH_NAME = "mame::token_merge"
ONNX_DOMAIN = "mame"
ONNX_OP_TYPE = "TokenMerge"
PLUGIN_ID = f"{ONNX_DOMAIN}::{ONNX_OP_TYPE}"
PLUGIN_VERSION = "1"
FUNCTION_VERSION = 1  # the "mame" opset version the function is declared under

INPUT_NAMES = ("hidden", "residual", "score", "score_b", "size", "origin", "cls")
OUTPUT_NAMES = ("hidden_out", "residual_out", "size_out", "origin_out", "cls_out")
# Inputs whose element type is fixed whatever the model's precision.
FIXED_TYPES = {"score": "float32", "score_b": "float32", "size": "float32", "origin": "int64", "cls": "int64"}
# Element types of hidden (and of residual, which may also be float32) that every face runs.
DTYPES = ("float32", "float16", "bfloat16")
RANKS = {"hidden": 3, "residual": 3, "score": 3, "score_b": 3, "size": 2, "origin": 2, "cls": 1}
LAYOUT = ("hidden, residual: batch x length x dim; score, score_b: batch x parts x length; size, origin: "
          "batch x length; cls: batch")
# Integer attributes in declaration order, then the floats.
INT_ATTRIBUTES = ("r", "prune", "split", "arrangement", "weighting", "metric")
FLOAT_ATTRIBUTES = ("lam", "score_scale")
SCORE_LANES = 8  # the score's parts are summed in this many interleaved lanes (a power of two)
ATTRIBUTES = INT_ATTRIBUTES + FLOAT_ATTRIBUTES

SPLITS = ("informativeness", "alternate")
ARRANGEMENTS = ("ordered", "concat")
WEIGHTINGS = ("informativeness", "size")
METRICS = ("hidden", "stream")


@dataclass(frozen=True)
class MergeAttributes:
    """The attribute values of one node; ``from_options`` maps merge options onto them."""

    r: int
    prune: int = 0
    split: int = 0
    arrangement: int = 0
    weighting: int = 0
    metric: int = 0
    lam: float = 0.0
    score_scale: float = 1.0

    def __post_init__(self):
        if self.r < 0:
            raise ValueError(f"TokenMerge: r must be >= 0, got {self.r}")
        for name, choices in (("prune", 2), ("split", len(SPLITS)), ("arrangement", len(ARRANGEMENTS)),
                              ("weighting", len(WEIGHTINGS)), ("metric", len(METRICS))):
            if getattr(self, name) not in range(choices):
                raise ValueError(f"TokenMerge: attribute {name} must be in 0..{choices - 1}, got {getattr(self, name)}")
        if not (math.isfinite(self.score_scale) and self.score_scale > 0):
            raise ValueError(f"TokenMerge: score_scale must be a positive finite number, got {self.score_scale}")

    @classmethod
    def from_options(cls, r: int, prune: bool, split: str, arrangement: str, weighting: str, metric: str,
                     lam: float, score_scale: float = 1.0) -> "MergeAttributes":
        return cls(int(r), int(bool(prune)), SPLITS.index(split), ARRANGEMENTS.index(arrangement),
                   WEIGHTINGS.index(weighting), METRICS.index(metric), float(lam), float(score_scale))

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in ATTRIBUTES}


def output_length(length: int, r: int) -> int:
    """Tokens after the step (class token included)."""
    return length - r


def check_length(length: int, r: int) -> None:
    """One step removes at most half of the ``length - 1`` patches."""
    if r > (length - 1) // 2:
        raise ValueError(f"TokenMerge: r={r} exceeds half of the {length - 1} patches")


def input_shapes(batch, length, dim, parts, parts_b) -> dict:
    """Each input's shape in terms of the five sizes (any of them may be unknown)."""
    return {"hidden": (batch, length, dim), "residual": (batch, length, dim), "score": (batch, parts, length),
            "score_b": (batch, parts_b, length), "size": (batch, length), "origin": (batch, length), "cls": (batch,)}


def is_node(node) -> bool:
    """Whether an ONNX ``NodeProto`` is a ``mame::TokenMerge`` node."""
    return node.domain == ONNX_DOMAIN and node.op_type == ONNX_OP_TYPE
