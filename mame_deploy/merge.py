"""MaMe token merging between Vision Mamba blocks, and the ToMe / pruning baselines.

A merge step runs right after block l. It removes a FIXED number r of patch tokens from every
sample, so every tensor keeps a static shape and the same code exports to ONNX: sorting of
fixed-size tensors (pairwise ranks where float keys may tie, TopK for distinct positions),
Gather, Scatter (no reduction), a small MatMul and Where. No NonZero, no boolean indexing,
no ``.item()``.

MaMe (see shared docs/mame.md), per sample, with s = the block's Delta informativeness:
  1. split the patches: the n // 2 lowest-s tokens are candidate sources, the rest destinations;
  2. each source finds its most cosine-similar destination on the merge metric;
  3. sources are ranked by that similarity minus ``lam`` x their normalised s; the top r merge;
  4. a destination becomes the (size x s)-weighted mean of itself and what it absorbed, on the
     hidden and residual streams alike (sizes add up);
  5. survivors keep their original order; a merged token sits where its destination was.
The class token is never merged; ``TokenState`` tracks where it is. Ties are broken by
position (stable sorts, first maximum), so a sample's result never depends on its batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mame_deploy.errors import UserError

METHODS = ("mame", "tome", "prune")
SPLITS = ("informativeness", "alternate")     # who may be a source: low-s half, or even positions
ARRANGEMENTS = ("ordered", "concat")          # survivors in scan order, or ToMe's [sources; dests]
WEIGHTINGS = ("informativeness", "size")      # merge weights size x s, or size alone
METRICS = ("hidden", "stream")                # similarity on the mixer output, or residual + it


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


def _stable_order(key: Tensor, descending: bool = False) -> Tensor:
    """Indices that sort ``key`` (B, n) along dim 1; equal keys keep their positional order.

    For float keys that can tie (informativeness, similarity). Ranks come from pairwise
    comparisons (O(n^2), small next to a block): unlike a sort or TopK, whose tie order a
    runtime may not keep, they break ties by position the same way on every runtime.
    """
    if descending:
        key = -key
    n = key.shape[1]
    pos = torch.arange(n, device=key.device)
    earlier = pos[None, :] < pos[:, None]                      # [i, j]: token j precedes token i
    ki, kj = key[:, :, None], key[:, None, :]
    rank = ((kj < ki) | ((kj == ki) & earlier)).sum(dim=-1)    # tokens that go before token i
    return torch.zeros_like(rank).scatter(1, rank, pos.expand_as(rank))


def _split(s: Tensor, split: str) -> tuple[Tensor, Tensor]:
    """Source and destination candidates as patch indices, each in ascending (scan) order."""
    B, n = s.shape
    if split == "alternate":  # ToMe: even positions are sources, odd ones destinations
        idx = torch.arange(n, device=s.device).expand(B, n)
        return idx[:, 0::2], idx[:, 1::2]
    order = _stable_order(s)                       # lowest informativeness first
    src, dst = order[:, : n // 2], order[:, n // 2:]
    return _ascending(src), _ascending(dst)


def _order_of_distinct(key: Tensor) -> Tensor:
    """Ascending order of keys that are all distinct (positions), so no tie-break is needed
    and a plain sort (ONNX TopK) is exact on every runtime: O(n log n), not O(n^2)."""
    return torch.sort(key, dim=1).indices


def _ascending(idx: Tensor) -> Tensor:
    return torch.sort(idx, dim=1).values


def _minmax(s: Tensor) -> Tensor:
    lo, hi = s.min(dim=1, keepdim=True).values, s.max(dim=1, keepdim=True).values
    return (s - lo) / (hi - lo).clamp_min(1e-12)


def _gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Rows ``x[b, idx[b, i]]`` of (B, L, E) ``x`` as (B, k, E). Whole rows by flat index (a
    row copy; ONNX GatherND on rows), not an element-wise gather with an expanded index."""
    B, L, E = x.shape
    return x.reshape(B * L, E)[_flat_rows(idx, L)]


def _put_tokens_(x: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
    """``x[b, idx[b, i]] = rows[b, i]`` in place (ONNX ScatterND on rows); repeated indices must
    carry identical rows."""
    B, L, E = x.shape
    x.view(B * L, E).index_put_((_flat_rows(idx, L),), rows)
    return x


def _flat_rows(idx: Tensor, L: int) -> Tensor:
    return idx + L * torch.arange(idx.shape[0], device=idx.device)[:, None]


def choose(metric: Optional[Callable[[Tensor], Tensor]], s: Tensor, r: int, method: str,
           opts: MergeOptions) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Which patches go where, from the patches' informativeness ``s`` (B, n) and ``metric``,
    a callable giving the unit-norm merge metric (B, k, E) of patch indices (B, k).

    Returns ``src`` (B, r): patch indices that leave the sequence; ``dst`` (B, r): the patch
    each of them merges into (None when pruning); ``is_dst`` (B, n) bool: destination
    candidates (None when pruning), which the concatenated arrangement puts last.
    """
    if method == "prune":  # EViT-like: the r least informative tokens are dropped
        return _stable_order(s)[:, :r], None, None
    src_set, dst_set = _split(s, opts.split)
    sim = metric(src_set) @ metric(dst_set).transpose(1, 2)
    best_sim, best_dst = sim.max(dim=-1)          # first maximum: ties go to the earlier token
    rank = best_sim - opts.lam * _minmax(s).gather(1, src_set) if opts.lam else best_sim
    chosen = _stable_order(rank, descending=True)[:, :r]
    src = src_set.gather(1, chosen)
    dst = dst_set.gather(1, best_dst.gather(1, chosen))
    is_dst = torch.zeros_like(s, dtype=torch.bool).scatter(1, dst_set, True)
    return src, dst, is_dst


def merge_step(hidden: Tensor, residual: Tensor, score: Tensor, state: TokenState, r: int,
               method: str, opts: MergeOptions) -> tuple[Tensor, Tensor, TokenState]:
    """Remove ``r`` patch tokens from (B, L, E) ``hidden``/``residual`` given the block's
    informativeness ``score`` (B, L); returns the two streams (B, L - r, E) and the new state.

    Full-width (B, L, E) passes are what a step costs on a GPU (it is memory-bound), so only
    the merge metric's rows are gathered for matching, each stream is read once by the gather
    of the survivors, and only the destinations' rows are then recomputed and written back.
    """
    B, L, _ = hidden.shape
    n, device = L - 1, hidden.device
    # Sequence position of every patch (class token skipped), in scan order.
    k = torch.arange(n, device=device).expand(B, n)
    patch_pos = k + (k >= state.cls[:, None]).long()
    s = score.float().gather(1, patch_pos)
    if method == "prune":
        metric = None
    else:
        full = hidden.float() if opts.metric == "hidden" else residual + hidden.float()
        full = F.normalize(full, dim=-1)
        metric = lambda idx: _gather_tokens(full, patch_pos.gather(1, idx))  # noqa: E731
    src, dst, is_dst = choose(metric, s, r, method, opts)

    # Output order of the n - r surviving patches: scan order, or ToMe's [sources; destinations].
    removed = torch.zeros_like(s, dtype=torch.bool).scatter(1, src, True)
    key = k.float() + (2 * n) * removed.float()
    if opts.arrangement == "concat" and is_dst is not None:
        key = key + n * is_dst.float()
    keep = _order_of_distinct(key)[:, : n - r]                  # patch indices, output order
    if opts.arrangement == "concat" and is_dst is not None:
        new_cls = torch.full_like(state.cls, (n - r) // 2)      # Vim's convention: the middle
    else:
        new_cls = (keep < state.cls[:, None]).sum(dim=1)        # survivors that precede it
    # Gather index into the current sequence for every output slot, class token re-inserted.
    slot = torch.arange(n - r + 1, device=device).expand(B, -1)
    before = (slot - (slot > new_cls[:, None]).long()).clamp(max=n - r - 1)
    seq_idx = torch.where(slot == new_cls[:, None], state.cls[:, None], patch_pos.gather(1, keep).gather(1, before))

    hidden_out, residual_out = _gather_tokens(hidden, seq_idx), _gather_tokens(residual, seq_idx)
    size_out, origin_out = state.size.gather(1, seq_idx), state.origin.gather(1, seq_idx)
    if dst is not None:
        # Output slot of each source's destination (after the re-inserted class token).
        patch_slot = torch.zeros_like(k).scatter(1, keep, torch.arange(n - r, device=device).expand(B, -1))
        dst_slot = patch_slot.gather(1, dst)
        dst_slot = dst_slot + (dst_slot >= new_cls[:, None]).long()
        src_seq = patch_pos.gather(1, src)                      # sources' sequence positions
        src_size = state.size.gather(1, src_seq)
        dst_size = size_out.gather(1, dst_slot)
        w_src, w_dst = src_size, dst_size
        if opts.weighting == "informativeness":
            w_src = w_src * s.gather(1, src)
            w_dst = w_dst * score.float().gather(1, seq_idx.gather(1, dst_slot))
        # Only destination rows change. For source i, its destination's row becomes
        # (w_dst * x_dst + sum of w_src_j * x_src_j over the sources j of that destination) / total,
        # i.e. x_dst * keep_w + fold @ x_src with fold (B, r, r). Sources sharing a destination
        # all write the row computed for the first of them, so the repeated writes are identical.
        same = (dst_slot[:, :, None] == dst_slot[:, None, :]).float()     # (B, r, r)
        first = same.argmax(dim=-1)                                        # first source of each group
        total = w_dst + (same @ w_src[..., None]).squeeze(-1)
        keep_w = (w_dst / total)[..., None]
        fold = same * (w_src[:, None, :] / total[..., None])

        def mean(x_out: Tensor, x: Tensor) -> Tensor:
            x_dst = _gather_tokens(x_out, dst_slot).float()
            merged = torch.baddbmm(x_dst * keep_w, fold, _gather_tokens(x, src_seq).float())
            return _put_tokens_(x_out, dst_slot, _gather_tokens(merged, first).to(x_out.dtype))

        hidden_out, residual_out = mean(hidden_out, hidden), mean(residual_out, residual)
        size_out = size_out.scatter(1, dst_slot, dst_size + (same @ src_size[..., None]).squeeze(-1))
    return hidden_out, residual_out, TokenState(size_out, origin_out, new_cls)


class TokenMerge:
    """The hook ``mame_deploy.patch`` installs on a VisionMamba (``model.token_merge``).

    ``schedule[i]`` tokens are removed right after block i; the model's forward loop calls
    ``start``, then ``__call__`` after each block with a non-zero count, then ``class_token``.
    """

    def __init__(self, schedule: list[int], method: str, options: MergeOptions):
        self.schedule, self.method, self.options = list(schedule), method, options

    def start(self, tokens: Tensor, cls_position: int) -> TokenState:
        return start_state(tokens, cls_position)

    def __call__(self, layer: int, hidden: Tensor, residual: Tensor, score: Tensor,
                 state: TokenState) -> tuple[Tensor, Tensor, TokenState]:
        return merge_step(hidden, residual, score, state, self.schedule[layer], self.method, self.options)

    @staticmethod
    def class_token(features: Tensor, state: TokenState) -> Tensor:
        """(B, L, E) -> (B, E): every sample's class token, wherever merging left it."""
        return _gather_tokens(features, state.cls[:, None]).squeeze(1)
