"""MaMe token merging between Vision Mamba blocks, and the ToMe / pruning baselines.

A merge step runs right after block l. It removes a FIXED number r of patch tokens from every
sample, so every tensor keeps a static shape. The whole step is one operator,
``mame::TokenMerge`` (mame_deploy/ops/token_merge: its reference decomposition defines it, a
CUDA kernel and a TensorRT plugin run it, an export writes it as one ONNX node carrying an ONNX
function); this module maps the methods and their switches onto it and tracks the token state.

MaMe (see docs/merging.md), per sample, with s = the block's Delta informativeness:
  1. split the patches: the n // 2 lowest-s tokens are candidate sources, the rest destinations;
  2. each source finds its most cosine-similar destination on the merge metric;
  3. sources are ranked by that similarity minus ``lam`` x their normalised s; the top r merge;
  4. a destination becomes the (size x s)-weighted mean of itself and what it absorbed, on the
     hidden and residual streams alike (sizes add up);
  5. survivors keep their original order; a merged token sits where its destination was.
The class token is never merged; ``TokenState`` tracks where it is. Decisions compare keys
rounded to float16, ties broken by position (stable ranks, first maximum), so runtimes agree
and a sample's result never depends on its batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from mame_deploy.errors import UserError
from mame_deploy.ops.token_merge import MergeAttributes, token_merge
from mame_deploy.ops.token_merge.contract import ARRANGEMENTS, METRICS, SPLITS, WEIGHTINGS
from mame_deploy.ops.token_merge.reference import gather_tokens

METHODS = ("mame", "tome", "prune")
# The switches (ops/token_merge/contract.py): split -- who may be a source, the low-s half or
# even positions; arrangement -- survivors in scan order or ToMe's [sources; destinations];
# weighting -- merge weights size x s or size alone; metric -- similarity on the mixer output
# ("hidden") or on residual + it ("stream").


@dataclass(frozen=True)
class MergeOptions:
    """The ablation switches of one merging method (``model.mame_options`` is its dict)."""

    split: str = "informativeness"
    arrangement: str = "ordered"
    weighting: str = "informativeness"
    lam: float = 0.0
    metric: str = "hidden"

    def as_dict(self) -> dict:
        return asdict(self)


# Each method is a preset; mame's switches make the ablations between it and ToMe.
# mame's ``lam`` was chosen on the digits train/val splits, never the test split: lam 1 and 2
# tie, both beat 0 by ~1.5 points at ratios 0.5-0.9 (docs/merging.md).
DEFAULT_OPTIONS = {
    "mame": MergeOptions(lam=1.0),
    "tome": MergeOptions(split="alternate", arrangement="concat", weighting="size"),
    "prune": MergeOptions(),  # drops the r lowest-s tokens: no switch applies
}


def merge_options(method: str = "mame", **switches) -> MergeOptions:
    """The preset of ``method`` with ``switches`` applied, validated (UserError on bad input)."""
    if method not in METHODS:
        raise UserError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}")
    opts = DEFAULT_OPTIONS[method]
    valid = set(opts.as_dict())
    bad = sorted(set(switches) - valid)
    if bad:
        raise UserError(f"unknown merge option(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}")
    switches = {k: v for k, v in switches.items() if v is not None}
    if method == "prune":
        changed = sorted(k for k, v in switches.items() if v != getattr(opts, k))
        if changed:
            raise UserError(f"option(s) {', '.join(changed)} do not apply to prune, which drops the "
                            "least informative tokens without matching; use them with mame or tome")
    for name, allowed in (("split", SPLITS), ("arrangement", ARRANGEMENTS),
                          ("weighting", WEIGHTINGS), ("metric", METRICS)):
        if name in switches and switches[name] not in allowed:
            raise UserError(f"{name} must be one of {', '.join(allowed)}, got {switches[name]!r}")
    if "lam" in switches:
        try:
            switches["lam"] = float(switches["lam"])
        except (TypeError, ValueError):
            raise UserError(f"lam must be a number, got {switches['lam']!r}") from None
        if not 0.0 <= switches["lam"] <= 10.0:
            raise UserError(f"lam must lie in [0, 10], got {switches['lam']}")
    return replace(opts, **switches)


class TokenState(NamedTuple):
    """What the merge steps carry besides the two streams, per sample."""

    size: Tensor    # (B, L) float32: original patches each token stands for (class token: 1)
    origin: Tensor  # (B, L) int64: original position of the token holding each slot
    cls: Tensor     # (B,) int64: where the class token is now


def start_state(tokens: Tensor, cls_position: int) -> TokenState:
    """State of the unmerged sequence ``tokens`` (B, L, E) with the class token at ``cls_position``."""
    B, L = tokens.shape[:2]
    size = torch.ones(B, L, dtype=torch.float32, device=tokens.device)
    origin = torch.arange(L, device=tokens.device).expand(B, L)
    cls = torch.full((B,), cls_position, dtype=torch.long, device=tokens.device)
    return TokenState(size, origin, cls)


def attributes(r: int, method: str, opts: MergeOptions, score_scale: float = 1.0) -> MergeAttributes:
    """The ``mame::TokenMerge`` attributes of one step removing ``r`` tokens."""
    return MergeAttributes.from_options(r, method == "prune", opts.split, opts.arrangement, opts.weighting,
                                        opts.metric, opts.lam, score_scale)


Score = Union[Tensor, tuple[Tensor, Tensor]]


def score_inputs(score: Score) -> tuple[Tensor, Tensor]:
    """The operator's two score inputs from a (B, L) score, its parts (B, K, L), or two sets of
    parts (Vim's two scans'); a lone score gets a part of zeros, which adds nothing."""
    if isinstance(score, tuple):
        return score
    parts = score[:, None] if score.dim() == 2 else score
    return parts, torch.zeros_like(parts[:, :1])


def merge_step(hidden: Tensor, residual: Tensor, score: Score, state: TokenState, r: int,
               method: str, opts: MergeOptions, score_scale: float = 1.0) -> tuple[Tensor, Tensor, TokenState]:
    """Remove ``r`` patch tokens from (B, L, E) ``hidden``/``residual`` given the block's
    informativeness: ``score`` (B, L), its parts (B, K, L), or two sets of parts (each
    (B, K_i, L)), whose sum the operator takes times ``score_scale``
    (ops/token_merge/contract.py); returns the two streams (B, L - r, E) and the new state. One
    ``mame::TokenMerge`` op (ops/token_merge: the reference on the CPU and while training, the
    fused kernel on CUDA, one ONNX node in an export)."""
    hidden, residual, size, origin, cls = token_merge(hidden, residual, *score_inputs(score), *state,
                                                      attributes(r, method, opts, score_scale))
    return hidden, residual, TokenState(size, origin, cls)


class TokenMerge:
    """The hook ``mame_deploy.patch`` installs on a VisionMamba (``model.token_merge``).

    ``schedule[i]`` tokens are removed right after block i; the model's forward loop calls
    ``start``, then ``__call__`` after each block with a non-zero count, then ``class_token``.
    While ``trace`` is a dict, each step records its decisions there: the ``origin`` and ``size``
    of the surviving tokens, keyed by the block it follows (what ``validate`` compares across
    runtimes).
    While ``perturb`` is (block, noise), that step's inputs are first scaled by 1 + noise x N(0, 1)
    (``decisions.near_tie`` uses it to ask whether a decision is a near-tie).
    """

    def __init__(self, schedule: list[int], method: str, options: MergeOptions):
        self.schedule, self.method, self.options = list(schedule), method, options
        self.trace: Optional[dict[int, tuple[Tensor, Tensor]]] = None
        self.perturb: Optional[tuple[int, float]] = None

    def start(self, tokens: Tensor, cls_position: int) -> TokenState:
        return start_state(tokens, cls_position)

    def __call__(self, layer: int, hidden: Tensor, residual: Tensor, score: Score,
                 state: TokenState, score_scale: float = 1.0) -> tuple[Tensor, Tensor, TokenState]:
        """One step after block ``layer``; ``score`` and ``score_scale`` as ``merge_step`` takes them."""
        if self.perturb is not None and self.perturb[0] == layer:
            noise = self.perturb[1]
            hidden, residual, *scores = (x * (1 + noise * torch.randn_like(x, dtype=torch.float32)).to(x.dtype)
                                         for x in (hidden, residual, *score_inputs(score)))
            score = tuple(scores)
        hidden, residual, state = merge_step(hidden, residual, score, state, self.schedule[layer], self.method,
                                             self.options, score_scale)
        if self.trace is not None:
            self.trace[layer] = (state.origin, state.size)
        return hidden, residual, state

    @property
    def layers(self) -> list[int]:
        """The blocks a merge step follows, in order."""
        return [layer for layer, count in enumerate(self.schedule) if count]

    @staticmethod
    def class_token(features: Tensor, state: TokenState) -> Tensor:
        """(B, L, E) -> (B, E): every sample's class token, wherever merging left it."""
        return gather_tokens(features, state.cls[:, None]).squeeze(1)
