"""The reference of ``mame::TokenMerge``: one merge step as a decomposition into PyTorch ops.

This is the operator's definition. The CUDA kernel, the ONNX function body and the tests are
checked against it; training runs through it (it is differentiable in the two streams).

Every tensor keeps a static shape for a given ``r``, so the same code also traces: sorting of
fixed-size tensors (pairwise ranks where keys may tie, a sort for distinct positions), gathers,
scatters (no reduction), a small batched MatMul and Where. No NonZero, no boolean indexing.

One step, per sample, with s = the patches' informativeness (class token skipped):
  1. split the patches: the n // 2 lowest-s are candidate sources, the rest destinations
     (``split`` 1: even positions are sources, as ToMe);
  2. each source finds its most cosine-similar destination on the metric (first maximum);
  3. sources are ranked by that similarity minus ``lam`` x their min-max normalised s; the top
     r merge (``prune``: the r lowest-s patches are dropped instead, nothing is matched);
  4. a destination becomes the (size x s)-weighted mean of itself and what it absorbed
     (``weighting`` 1: size alone), on both streams; sizes add up;
  5. survivors keep their order (``arrangement`` 1: ToMe's [unmerged sources; destinations]).
Decision keys are rounded to float16 and equal keys ordered by position (see contract.py).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .contract import SCORE_LANES, MergeAttributes, check_length


def informativeness(score: Tensor, scale: float) -> Tensor:
    """The per-token informativeness (B, L) from its K parts ``score`` (B, K, L), in the
    contract's order: lane c adds parts c, c + SCORE_LANES, ... one after the other (from 0), the
    lanes are added pairwise (neighbours first), and the sum is multiplied by ``scale`` in float32.
    Element-wise adds in that order, so the kernel, which adds the same way, gets the same bits."""
    B, K, L = score.shape
    parts = F.pad(score.float(), (0, 0, 0, -K % SCORE_LANES)).view(B, -1, SCORE_LANES, L)
    lanes = score.new_zeros(B, SCORE_LANES, L, dtype=torch.float32)
    for i in range(parts.shape[1]):
        lanes = lanes + parts[:, i]
    while lanes.shape[1] > 1:
        lanes = lanes[:, 0::2] + lanes[:, 1::2]
    return lanes[:, 0] * scale  # a Python float: PyTorch multiplies by it rounded to float32


def decision_key(x: Tensor) -> Tensor:
    """``x`` rounded to float16 (nearest even) and back to float32: the value every face
    compares, so float32 rounding noise below float16's spacing cannot reorder two keys."""
    return x.float().to(torch.float16).float()


def stable_order(key: Tensor, descending: bool = False) -> Tensor:
    """Indices that sort ``key`` (B, n) along dim 1; equal keys keep their positional order.

    Ranks come from pairwise comparisons (O(n^2), small next to a block): unlike a sort or TopK,
    whose tie order a runtime may not keep, they break ties by position on every runtime.
    """
    if descending:
        key = -key
    n = key.shape[1]
    pos = torch.arange(n, device=key.device)
    earlier = pos[None, :] < pos[:, None]                      # [i, j]: token j precedes token i
    ki, kj = key[:, :, None], key[:, None, :]
    rank = ((kj < ki) | ((kj == ki) & earlier)).sum(dim=-1)    # tokens that go before token i
    return torch.zeros_like(rank).scatter(1, rank, pos.expand_as(rank))


def order_of_distinct(key: Tensor) -> Tensor:
    """Ascending order of keys that are all distinct (positions), so no tie-break is needed
    and a plain sort (ONNX TopK) is exact on every runtime: O(n log n), not O(n^2)."""
    return torch.sort(key, dim=1).indices


def _ascending(idx: Tensor) -> Tensor:
    return torch.sort(idx, dim=1).values


def minmax(s: Tensor) -> Tensor:
    lo, hi = s.min(dim=1, keepdim=True).values, s.max(dim=1, keepdim=True).values
    return (s - lo) / (hi - lo).clamp_min(1e-12)


def flat_rows(idx: Tensor, L: int) -> Tensor:
    return idx + L * torch.arange(idx.shape[0], device=idx.device)[:, None]


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Rows ``x[b, idx[b, i]]`` of (B, L, E) ``x`` as (B, k, E). Whole rows by flat index (a
    row copy; in an export one Gather on axis 0, whose output shape is the index's plus E),
    not an element-wise gather. ``F.embedding`` is exactly that lookup, and differentiable."""
    B, L, E = x.shape
    return F.embedding(flat_rows(idx, L), x.reshape(B * L, E))


def _put_tokens_(x: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
    """``x[b, idx[b, i]] = rows[b, i]`` in place (ONNX ScatterND on rows); repeated indices must
    carry identical rows. Autograd runs through it: nothing saved for backward reads ``x``."""
    B, L, E = x.shape
    x.view(B * L, E).index_put_((flat_rows(idx, L),), rows)
    return x


def split(s_key: Tensor, alternate: bool) -> tuple[Tensor, Tensor]:
    """Source and destination candidates as patch indices, each in ascending (scan) order."""
    B, n = s_key.shape
    if alternate:  # ToMe: even positions are sources, odd ones destinations
        idx = torch.arange(n, device=s_key.device).expand(B, n)
        return idx[:, 0::2], idx[:, 1::2]
    order = stable_order(s_key)                    # lowest informativeness first
    return _ascending(order[:, : n // 2]), _ascending(order[:, n // 2:])


def choose(metric: Optional[Callable[[Tensor], Tensor]], s: Tensor, attrs: MergeAttributes
           ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Which patches go where, from the patches' informativeness ``s`` (B, n) and ``metric``,
    a callable giving the unit-norm merge metric (B, k, E) of patch indices (B, k).

    Returns ``src`` (B, r): patch indices that leave the sequence; ``dst`` (B, r): the patch
    each of them merges into (None when pruning); ``is_dst`` (B, n) bool: destination
    candidates (None when pruning), which the concatenated arrangement puts last.
    """
    r, s_key = attrs.r, decision_key(s)
    if attrs.prune:  # EViT-like: the r least informative tokens are dropped
        return stable_order(s_key)[:, :r], None, None
    src_set, dst_set = split(s_key, bool(attrs.split))
    sim = decision_key(metric(src_set) @ metric(dst_set).transpose(1, 2))
    best_sim, best_dst = sim.max(dim=-1)          # first maximum: ties go to the earlier token
    rank = best_sim
    if attrs.lam:
        rank = decision_key(best_sim - attrs.lam * minmax(s_key).gather(1, src_set))
    chosen = stable_order(rank, descending=True)[:, :r]
    src = src_set.gather(1, chosen)
    dst = dst_set.gather(1, best_dst.gather(1, chosen))
    is_dst = torch.zeros_like(s, dtype=torch.bool).scatter(1, dst_set, True)
    return src, dst, is_dst


def token_merge_ref(hidden: Tensor, residual: Tensor, score: Tensor, score_b: Tensor, size: Tensor,
                    origin: Tensor, cls: Tensor, attrs: MergeAttributes
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Remove ``attrs.r`` patch tokens from (B, L, E) ``hidden``/``residual`` given the block's
    informativeness as parts ``score`` (B, K, L) and ``score_b`` (B, K2, L) (concatenated and
    summed by ``informativeness`` with ``attrs.score_scale``) and the token state (``size``,
    ``origin``, ``cls``).

    Full-width (B, L, E) passes are what a step costs on a GPU (it is memory-bound), so only
    the merge metric's rows are gathered for matching, each stream is read once by the gather
    of the survivors, and only the destinations' rows are then recomputed and written back.
    """
    B, L, _ = hidden.shape
    r = attrs.r
    check_length(L, r)
    if r == 0:  # nothing leaves: the step is the identity
        return hidden, residual, size, origin, cls
    n, device = L - 1, hidden.device
    # Sequence position of every patch (class token skipped), in scan order.
    k = torch.arange(n, device=device).expand(B, n)
    patch_pos = k + (k >= cls[:, None]).long()
    score = informativeness(torch.cat([score, score_b], dim=1), attrs.score_scale)
    s = score.gather(1, patch_pos)
    if attrs.prune:
        metric = None
    else:
        full = hidden.float() if attrs.metric == 0 else residual.float() + hidden.float()
        full = F.normalize(full, dim=-1)
        metric = lambda idx: gather_tokens(full, patch_pos.gather(1, idx))  # noqa: E731
    src, dst, is_dst = choose(metric, s, attrs)
    concat = bool(attrs.arrangement) and is_dst is not None

    # Output order of the n - r surviving patches: scan order, or ToMe's [sources; destinations].
    removed = torch.zeros_like(s, dtype=torch.bool).scatter(1, src, True)
    key = k.float() + (2 * n) * removed.float()
    if concat:
        key = key + n * is_dst.float()
    keep = order_of_distinct(key)[:, : n - r]                  # patch indices, output order
    if concat:
        new_cls = torch.full_like(cls, (n - r) // 2)           # Vim's convention: the middle
    else:
        new_cls = (keep < cls[:, None]).sum(dim=1)             # survivors that precede it
    # Gather index into the current sequence for every output slot, class token re-inserted.
    slot = torch.arange(n - r + 1, device=device).expand(B, -1)
    before = (slot - (slot > new_cls[:, None]).long()).clamp(max=n - r - 1)
    seq_idx = torch.where(slot == new_cls[:, None], cls[:, None], patch_pos.gather(1, keep).gather(1, before))

    hidden_out, residual_out = gather_tokens(hidden, seq_idx), gather_tokens(residual, seq_idx)
    size_out, origin_out = size.gather(1, seq_idx), origin.gather(1, seq_idx)
    if dst is not None:
        # Output slot of each source's destination (after the re-inserted class token).
        patch_slot = torch.zeros_like(k).scatter(1, keep, torch.arange(n - r, device=device).expand(B, -1))
        dst_slot = patch_slot.gather(1, dst)
        dst_slot = dst_slot + (dst_slot >= new_cls[:, None]).long()
        src_seq = patch_pos.gather(1, src)                      # sources' sequence positions
        src_size = size.gather(1, src_seq)
        dst_size = size_out.gather(1, dst_slot)
        w_src, w_dst = src_size, dst_size
        if attrs.weighting == 0:
            w_src = w_src * s.gather(1, src)
            w_dst = w_dst * score.gather(1, seq_idx.gather(1, dst_slot))
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
            x_dst = gather_tokens(x_out, dst_slot).float()
            merged = torch.baddbmm(x_dst * keep_w, fold, gather_tokens(x, src_seq).float())
            return _put_tokens_(x_out, dst_slot, gather_tokens(merged, first).to(x_out.dtype))

        hidden_out, residual_out = mean(hidden_out, hidden), mean(residual_out, residual)
        size_out = size_out.scatter(1, dst_slot, dst_size + (same @ src_size[..., None]).squeeze(-1))
    return hidden_out, residual_out, size_out, origin_out, new_cls
