"""The ONNX face of ``mame::TokenMerge``: its function body, from standard operators.

An export keeps every merge step as ONE node in the ``mame`` domain (so TensorRT's parser binds
it to the plugin) carrying this function, so onnxruntime, ``onnx.reference`` and any other
runtime execute the very same file. The body follows ``reference.py`` step for step: the same
float16-rounded decision keys, the same position tie-breaks (pairwise ranks, first maximum),
the same float32 arithmetic for the weighted means. The structural switches (prune, split,
metric) are If nodes on attribute constants, which runtimes fold when they inline the function.

Rows are taken with flat-index Gather / ScatterND on (B * L, E) views and one-hot comparisons,
never GatherElements or ScatterElements (onnx.reference's GatherElements fails beyond 64 entries
along the axis, and element-wise index tensors would cost a full-width int64 pass).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from mame_deploy.ops.onnx_builder import BOOL, FLOAT, FLOAT16, INT64, Body

from .contract import INPUT_NAMES, ONNX_DOMAIN, ONNX_OP_TYPE, OUTPUT_NAMES, SCORE_LANES, MergeAttributes

MIN_OPSET = 18  # ReduceMax/ReduceSum with axes as inputs where needed, Shape(start, end)


class _Ops:
    """Shape-generic pieces of the step on one Body (the function or an If branch)."""

    def __init__(self, g: Body, batch: str):
        self.g, self.batch = g, batch

    def scalar(self, value, dtype=INT64) -> str:
        return self.g.const(value, {INT64: np.int64, FLOAT: np.float32}[dtype])

    def vec(self, *values) -> str:
        return self.g.const(list(values), np.int64)

    def dim(self, x: str, axis: int) -> str:
        """Size of ``x`` along ``axis`` as an int64 scalar."""
        return self.g.op("Squeeze", [self.g.op("Shape", [x], start=axis, end=axis + 1)])

    def arange(self, stop: str, start: int = 0, step: int = 1) -> str:
        return self.g.op("Range", [self.scalar(start), stop, self.scalar(step)])

    def key(self, x: str) -> str:
        """reference.decision_key: rounded to float16 and back."""
        return self.g.op("Cast", [self.g.op("Cast", [x], to=FLOAT16)], to=FLOAT)

    def unsq(self, x: str, *axes: int) -> str:
        return self.g.op("Unsqueeze", [x, self.vec(*axes)])

    def flat_index(self, idx: str, width: str) -> str:
        """idx (B, k) into rows of width ``width`` -> indices into the flattened (B * width)."""
        offsets = self.g.op("Mul", [self.unsq(self.arange(self.batch), 1), width])
        return self.g.op("Add", [idx, offsets])

    def take(self, x: str, idx: str) -> str:
        """x[b, idx[b, i]] of a (B, W) tensor as (B, k)."""
        flat = self.g.op("Reshape", [x, self.vec(-1)])
        return self.g.op("Gather", [flat, self.flat_index(idx, self.dim(x, 1))], axis=0)

    def take_rows(self, x: str, idx: str) -> str:
        """Rows x[b, idx[b, i]] of a (B, W, E) tensor as (B, k, E)."""
        rows = self.g.op("Reshape", [x, self.g.op("Concat", [self.vec(-1), self.g.op("Shape", [x], start=2, end=3)],
                                                   axis=0)])
        return self.g.op("Gather", [rows, self.flat_index(idx, self.dim(x, 1))], axis=0)

    def put_rows(self, x: str, idx: str, rows: str) -> str:
        """x with x[b, idx[b, i]] = rows[b, i] (x: (B, W, E) or (B, W); repeats carry equal rows)."""
        g = self.g
        shape = g.op("Shape", [x])
        width = self.dim(x, 1)
        flat_shape = g.op("Concat", [self.vec(-1), g.op("Shape", [x], start=2)], axis=0)
        flat = g.op("Reshape", [x, flat_shape])
        where = self.unsq(self.flat_index(idx, width), 2)
        return g.op("Reshape", [g.op("ScatterND", [flat, where, rows]), shape])

    def stable_order(self, key: str, descending: bool = False) -> str:
        """reference.stable_order: pairwise ranks (ties by position), then the permutation."""
        g = self.g
        if descending:
            key = g.op("Neg", [key])
        m = self.dim(key, 1)
        pos = self.arange(m)
        earlier = g.op("Less", [self.unsq(pos, 0), self.unsq(pos, 1)])          # [i, j]: j < i
        ki, kj = self.unsq(key, 2), self.unsq(key, 1)
        goes_before = g.op("Or", [g.op("Less", [kj, ki]), g.op("And", [g.op("Equal", [kj, ki]), earlier])])
        rank = g.op("ReduceSum", [g.op("Cast", [goes_before], to=INT64), self.vec(2)], keepdims=0)
        return self.sort_distinct(rank, m)[1]

    def sort_distinct(self, key: str, count: str) -> tuple[str, str]:
        """(values, indices) of the ``count`` smallest of distinct keys, ascending (exact TopK)."""
        g = self.g
        values, indices = g.ops("TopK", [g.op("Cast", [key], to=FLOAT), self.unsq(count, 0)],
                                [g.fresh("sorted"), g.fresh("order")], largest=0, sorted=1)
        return values, indices

    def ascending(self, idx: str) -> str:
        """Sorted values of distinct int64 indices (B, k)."""
        values, _ = self.sort_distinct(idx, self.dim(idx, 1))
        return self.g.op("Cast", [values], to=INT64)

    def first(self, x: str, count: str) -> str:
        """x[:, :count]."""
        return self.g.op("Slice", [x, self.vec(0), self.unsq(count, 0), self.vec(1)])

    def member_mask(self, idx: str, n: str) -> str:
        """(B, n) float 1.0 where position p appears in idx (B, k), else 0.0 (one-hot compare)."""
        g = self.g
        hits = g.op("Equal", [self.unsq(idx, 2), self.unsq(self.unsq(self.arange(n), 0), 0)])
        return g.op("ReduceMax", [g.op("Cast", [hits], to=FLOAT), self.vec(1)], keepdims=0)

    def unit_rows(self, x: str) -> str:
        """F.normalize(x, dim=-1): x / max(||x||, 1e-12)."""
        g = self.g
        norm = g.op("Sqrt", [g.op("ReduceSum", [g.op("Mul", [x, x]), self.vec(-1)], keepdims=1)])
        return g.op("Div", [x, g.op("Max", [norm, self.scalar(1e-12, FLOAT)])])

    def informativeness(self, parts: str, scale: str) -> str:
        """reference.informativeness: (B, K, L) parts -> (B, L): lanes of every SCORE_LANES-th
        part (the last row of a CumSum: one add after the other, as the reference; a ReduceSum
        may add in any order), lanes pairwise, times ``scale``."""
        g = self.g
        K = self.dim(parts, 1)
        lanes = self.scalar(SCORE_LANES)
        pad = g.op("Mod", [g.op("Sub", [lanes, g.op("Mod", [K, lanes])]), lanes])
        zero = self.vec(0)
        pads = g.op("Concat", [zero, zero, zero, zero, self.unsq(pad, 0), zero], axis=0)
        padded = g.op("Pad", [parts, pads])
        shape = g.op("Concat", [g.op("Shape", [parts], start=0, end=1), self.vec(-1, SCORE_LANES),
                                g.op("Shape", [parts], start=2, end=3)], axis=0)
        running = g.op("CumSum", [g.op("Reshape", [padded, shape]), self.scalar(1)])
        x = g.op("Squeeze", [g.op("Slice", [running, self.vec(-1), self.vec(np.iinfo(np.int64).max), self.vec(1)]),
                             self.vec(1)])  # (B, lanes, L)
        width = SCORE_LANES
        while width > 1:
            half = lambda start: g.op("Slice", [x, self.vec(start), self.vec(width), self.vec(1), self.vec(2)])  # noqa
            x, width = g.op("Add", [half(0), half(1)]), width // 2
        return g.op("Mul", [g.op("Squeeze", [x, self.vec(1)]), scale])

    def minmax(self, s: str) -> str:
        g = self.g
        lo = g.op("ReduceMin", [s, self.vec(1)], keepdims=1)
        hi = g.op("ReduceMax", [s, self.vec(1)], keepdims=1)
        return g.op("Div", [g.op("Sub", [s, lo]), g.op("Max", [g.op("Sub", [hi, lo]), self.scalar(1e-12, FLOAT)])])


def _flag(g: Body, attribute: str) -> str:
    return g.op("Cast", [g.const_from_attribute(attribute)], attribute + "_flag", to=BOOL)


def _choose_prune(ops: _Ops, s_key: str, n: str, r: str) -> tuple[Body, list[str]]:
    g = ops.g.child("prune_")
    sub = _Ops(g, ops.batch)
    src = sub.first(sub.stable_order(s_key), r)
    no_dst = g.op("ConstantOfShape", [g.op("Shape", [s_key])], value=helper.make_tensor("zero", FLOAT, [1], [0.0]))
    outs = [g.op("Identity", [src]), g.op("Identity", [src]), g.op("Identity", [no_dst])]
    return g, outs


def _split(ops: _Ops, s_key: str, n: str, alternate: bool) -> tuple[Body, list[str]]:
    g = ops.g.child("alt_" if alternate else "inf_")
    sub = _Ops(g, ops.batch)
    if alternate:  # even positions are sources, odd ones destinations
        shape = lambda x: g.op("Concat", [g.op("Shape", [s_key], start=0, end=1), g.op("Shape", [x])], axis=0)  # noqa
        evens, odds = sub.arange(n, 0, 2), sub.arange(n, 1, 2)
        src = g.op("Expand", [sub.unsq(evens, 0), shape(evens)])
        dst = g.op("Expand", [sub.unsq(odds, 0), shape(odds)])
    else:
        order = sub.stable_order(s_key)
        half = g.op("Div", [n, sub.scalar(2)])
        src = sub.ascending(sub.first(order, half))
        dst = sub.ascending(g.op("Slice", [order, sub.unsq(half, 0), sub.unsq(n, 0), sub.vec(1)]))
    return g, [g.op("Identity", [src]), g.op("Identity", [dst])]


def _metric(ops: _Ops, hidden: str, residual: str, stream: bool) -> tuple[Body, list[str]]:
    g = ops.g.child("stream_" if stream else "hidden_")
    full = g.op("Cast", [hidden], to=FLOAT)
    if stream:
        full = g.op("Add", [g.op("Cast", [residual], to=FLOAT), full])
    return g, [g.op("Identity", [full])]


def _if(g: Body, cond: str, then: tuple[Body, list[str]], other: tuple[Body, list[str]], names: list[str]) -> list[str]:
    (then_body, then_outs), (else_body, else_outs) = then, other
    return g.ops("If", [cond], names, then_branch=then_body.graph(g.fresh("then"), then_outs),
                 else_branch=else_body.graph(g.fresh("else"), else_outs))


def _choose_match(ops: _Ops, flags: dict, full: str, src_set: str, dst_set: str, patch_pos: str, s_key: str,
                  n: str, r: str) -> tuple[Body, list[str]]:
    g = ops.g.child("match_")
    sub = _Ops(g, ops.batch)

    def unit_metric(idx: str) -> str:
        return sub.unit_rows(sub.take_rows(full, sub.take(patch_pos, idx)))

    sim = g.op("MatMul", [unit_metric(src_set), g.op("Transpose", [unit_metric(dst_set)], perm=[0, 2, 1])])
    sim = sub.key(sim)
    best = g.op("ReduceMax", [sim, sub.vec(2)], keepdims=0)
    best_dst = g.op("ArgMax", [sim], axis=2, keepdims=0, select_last_index=0)   # first maximum
    lam = flags["lam"]
    rank = sub.key(g.op("Sub", [best, g.op("Mul", [lam, sub.take(sub.minmax(s_key), src_set)])]))
    chosen = sub.first(sub.stable_order(rank, descending=True), r)
    src = sub.take(src_set, chosen)
    dst = sub.take(dst_set, sub.take(best_dst, chosen))
    return g, [g.op("Identity", [src]), g.op("Identity", [dst]), g.op("Identity", [sub.member_mask(dst_set, n)])]


def _fold(ops: _Ops, flags: dict, hidden: str, residual: str, hidden_g: str, residual_g: str, size: str, size_g: str,
          score: str, s: str, patch_pos: str, seq_idx: str, keep: str, new_cls: str, src: str, dst: str
          ) -> tuple[Body, list[str]]:
    """Destinations become the weighted means of themselves and their sources (reference.py)."""
    g = ops.g.child("fold_")
    sub = _Ops(g, ops.batch)
    one_hot = g.op("Cast", [g.op("Equal", [sub.unsq(dst, 2), sub.unsq(keep, 1)])], to=FLOAT)
    dst_slot = g.op("ArgMax", [one_hot], axis=2, keepdims=0)
    dst_slot = g.op("Add", [dst_slot, g.op("Cast", [g.op("GreaterOrEqual", [dst_slot, sub.unsq(new_cls, 1)])],
                                           to=INT64)])
    src_seq = sub.take(patch_pos, src)
    src_size, dst_size = sub.take(size, src_seq), sub.take(size_g, dst_slot)
    informed = g.op("Not", [flags["weighting"]])
    w_src = g.op("Where", [informed, g.op("Mul", [src_size, sub.take(s, src)]), src_size])
    w_dst = g.op("Where", [informed, g.op("Mul", [dst_size, sub.take(score, sub.take(seq_idx, dst_slot))]), dst_size])
    same = g.op("Cast", [g.op("Equal", [sub.unsq(dst_slot, 2), sub.unsq(dst_slot, 1)])], to=FLOAT)
    first = g.op("ArgMax", [same], axis=2, keepdims=0)
    column = lambda x: g.op("Squeeze", [g.op("MatMul", [same, sub.unsq(x, 2)]), sub.vec(2)])  # noqa: E731
    total = g.op("Add", [w_dst, column(w_src)])
    keep_w = sub.unsq(g.op("Div", [w_dst, total]), 2)
    fold = g.op("Mul", [same, g.op("Div", [sub.unsq(w_src, 1), sub.unsq(total, 2)])])

    def mean(x_g: str, x: str) -> str:
        x_dst = g.op("Cast", [sub.take_rows(x_g, dst_slot)], to=FLOAT)
        merged = g.op("Add", [g.op("Mul", [x_dst, keep_w]),
                              g.op("MatMul", [fold, g.op("Cast", [sub.take_rows(x, src_seq)], to=FLOAT)])])
        rows = g.op("CastLike", [sub.take_rows(merged, first), x_g])
        return sub.put_rows(x_g, dst_slot, rows)

    size_out = sub.put_rows(size_g, dst_slot, g.op("Add", [dst_size, column(src_size)]))
    outs = [mean(hidden_g, hidden), mean(residual_g, residual), size_out]
    return g, [g.op("Identity", [o]) for o in outs]


def _passthrough(ops: _Ops, names: list[str]) -> tuple[Body, list[str]]:
    g = ops.g.child("keep_")
    return g, [g.op("Identity", [name]) for name in names]


def token_merge_function(opset: int) -> onnx.FunctionProto:
    """``mame::TokenMerge`` as an ONNX function over the default domain at ``opset``."""
    if opset < MIN_OPSET:
        raise ValueError(f"the TokenMerge function needs opset >= {MIN_OPSET}, got {opset}")
    g = Body()
    hidden, residual, score_parts, score_parts_b, size, origin, cls = INPUT_NAMES
    batch = g.op("Squeeze", [g.op("Shape", [hidden], start=0, end=1)], "batch")
    ops = _Ops(g, batch)
    n = g.op("Sub", [ops.dim(hidden, 1), ops.scalar(1)], "patches")
    r = g.const_from_attribute("r", name="r")
    # Attribute constants at the top: subgraphs read them from the outer scope.
    flags = {name: _flag(g, name) for name in ("prune", "split", "arrangement", "weighting", "metric")}
    flags["lam"] = g.const_from_attribute("lam", "float", name="lam")
    prune = flags["prune"]

    parts = g.op("Concat", [score_parts, score_parts_b], axis=1)  # the contract's order of the parts
    score = ops.informativeness(parts, g.const_from_attribute("score_scale", "float", name="score_scale"))
    # Sequence position of every patch (class token skipped), in scan order; their scores.
    k = ops.arange(n)
    cls_col = ops.unsq(cls, 1)
    patch_pos = g.op("Add", [ops.unsq(k, 0), g.op("Cast", [g.op("GreaterOrEqual", [ops.unsq(k, 0), cls_col])],
                                                  to=INT64)], "patch_pos")
    s = ops.take(score, patch_pos)
    s_key = ops.key(s)
    # No If inside an If: onnxruntime cannot inline nested ones whose branches are constant.
    src_set, dst_set = _if(g, flags["split"], _split(ops, s_key, n, True), _split(ops, s_key, n, False),
                           ["src_set", "dst_set"])
    (full,) = _if(g, flags["metric"], _metric(ops, hidden, residual, True), _metric(ops, hidden, residual, False),
                  ["metric"])
    src, dst, is_dst = _if(g, prune, _choose_prune(ops, s_key, n, r),
                           _choose_match(ops, flags, full, src_set, dst_set, patch_pos, s_key, n, r),
                           ["src", "dst", "is_dst"])

    # Output order: scan order, or (concat, when matching) [unmerged sources; destinations].
    concat = g.op("And", [flags["arrangement"], g.op("Not", [prune])], "concat")
    n_f = g.op("Cast", [n], to=FLOAT)
    key = g.op("Add", [g.op("Cast", [ops.unsq(k, 0)], to=FLOAT),
                       g.op("Mul", [g.op("Mul", [ops.scalar(2.0, FLOAT), n_f]), ops.member_mask(src, n)])])
    key = g.op("Add", [key, g.op("Mul", [g.op("Mul", [g.op("Cast", [concat], to=FLOAT), n_f]), is_dst])])
    kept = g.op("Sub", [n, r], "kept")
    _, keep = ops.sort_distinct(key, kept)
    middle = g.op("Expand", [g.op("Div", [kept, ops.scalar(2)]), g.op("Shape", [cls])])
    preceding = g.op("ReduceSum", [g.op("Cast", [g.op("Less", [keep, cls_col])], to=INT64), ops.vec(1)], keepdims=0)
    new_cls = g.op("Where", [concat, middle, preceding], "new_cls")

    # Gather index into the current sequence for every output slot, class token re-inserted.
    slot = ops.unsq(ops.arange(g.op("Add", [kept, ops.scalar(1)])), 0)
    new_cls_col = ops.unsq(new_cls, 1)
    before = g.op("Min", [g.op("Sub", [slot, g.op("Cast", [g.op("Greater", [slot, new_cls_col])], to=INT64)]),
                          g.op("Sub", [kept, ops.scalar(1)])])
    seq_idx = g.op("Where", [g.op("Equal", [slot, new_cls_col]), cls_col,
                             ops.take(ops.take(patch_pos, keep), before)], "seq_idx")
    hidden_g, residual_g = ops.take_rows(hidden, seq_idx), ops.take_rows(residual, seq_idx)
    size_g = ops.take(size, seq_idx)
    g.op("Identity", [ops.take(origin, seq_idx)], "origin_out")
    g.op("Identity", [new_cls], "cls_out")
    _if(g, prune, _passthrough(ops, [hidden_g, residual_g, size_g]),
        _fold(ops, flags, hidden, residual, hidden_g, residual_g, size, size_g, score, s, patch_pos, seq_idx, keep,
              new_cls, src, dst),
        ["hidden_out", "residual_out", "size_out"])

    # The attributes' defaults are MergeAttributes' own (r = 0: a step that removes nothing).
    defaults = [helper.make_attribute(a, v) for a, v in MergeAttributes(r=0).as_dict().items()]
    return helper.make_function(
        ONNX_DOMAIN, ONNX_OP_TYPE, list(INPUT_NAMES), list(OUTPUT_NAMES), g.nodes,
        opset_imports=[helper.make_opsetid("", opset)], attribute_protos=defaults,
        doc_string="One token-merge step (MaMe / ToMe / pruning); see mame_deploy/ops/token_merge.",
    )
