"""Token merging: the merge step against a per-sample loop written from docs (docs/merging.md), the
invariants the issue names, the patched model, and ONNX export of the merging ops."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import mame_deploy
from mame_deploy.errors import UserError
from mame_deploy.merge import TokenState, merge_options, merge_step, start_state
from mame_deploy.models import create_model
from mame_deploy.ops.token_merge import MergeAttributes
from mame_deploy.ops.token_merge.reference import token_merge_ref
from mame_deploy.schedule import tokens_per_layer

OPTION_SETS = [
    ("mame", {}),
    ("mame", {"lam": 0.7}),
    ("mame", {"split": "alternate"}),
    ("mame", {"arrangement": "concat"}),
    ("mame", {"weighting": "size", "metric": "stream"}),
    ("tome", {}),
    ("prune", {}),
]


@pytest.fixture(autouse=True)
def _one_thread(_deterministic_threads):
    # Small ops in loops: one thread is as fast, and immune to a busy second core (see test_digits).
    torch.set_num_threads(1)
    yield


def tiny_model(depth=4, **kw):
    # 8 x 8 = 64 patches; a few blocks: fast enough for property tests on the CPU.
    return create_model("vim_t", depth=depth, embed_dim=32, img_size=32, patch_size=4, **kw)


# ---------------------------------------------------------------------------------------------
# A per-sample reference, straight from the method's description (lists, float64, no batching)


def key16(x: float) -> float:
    """The decision rule: keys are compared after rounding to float16 (ties: position)."""
    return float(np.float16(x))


def reference_step(h, res, s, size, origin, cls, r, method, opts):
    """One sample: h, res (L, E); s, size (L,); origin list; cls int. Returns the same kinds."""
    h, res, s, size = h.double(), res.double(), s.double(), size.double()
    L = h.shape[0]
    patches = [t for t in range(L) if t != cls]
    s_key = {t: key16(s[t].item()) for t in patches}
    by_score = sorted(patches, key=lambda t: (s_key[t], t))  # ties: earlier position first
    if method == "prune":
        keep = [t for t in range(L) if t not in by_score[:r]]
        return h[keep], res[keep], size[keep], [origin[t] for t in keep], keep.index(cls)
    if opts.split == "alternate":
        src, dst = patches[0::2], patches[1::2]
    else:
        low = set(by_score[: len(patches) // 2])
        src, dst = [t for t in patches if t in low], [t for t in patches if t not in low]
    metric = F.normalize(h if opts.metric == "hidden" else res + h, dim=-1)
    lo, hi = min(s_key.values()), max(s_key.values())
    best, rank = {}, {}
    for a in src:
        sims = [key16((metric[a] @ metric[b]).item()) for b in dst]
        j = max(range(len(dst)), key=lambda k: (sims[k], -k))   # first maximum
        best[a] = dst[j]
        rank[a] = key16(sims[j] - opts.lam * (s_key[a] - lo) / max(hi - lo, 1e-12))
    chosen = sorted(src, key=lambda a: (-rank[a], a))[:r]
    survivors = [t for t in range(L) if t not in chosen]
    if opts.arrangement == "concat":
        rest = [t for t in survivors if t != cls]
        order = [t for t in rest if t in src] + [t for t in rest if t in dst]
        order.insert(len(order) // 2, cls)
    else:
        order = survivors
    weight = size * (s if opts.weighting == "informativeness" else 1.0)
    out_h, out_res, out_size = [], [], []
    for t in order:
        group = [t] + [a for a in chosen if best[a] == t]
        w = weight[group][:, None]
        out_h.append((w * h[group]).sum(0) / w.sum())
        out_res.append((w * res[group]).sum(0) / w.sum())
        out_size.append(size[group].sum())
    return torch.stack(out_h), torch.stack(out_res), torch.stack(out_size), [origin[t] for t in order], order.index(cls)


def random_state(B, L, E, seed):
    g = torch.Generator().manual_seed(seed)
    hidden, residual = torch.randn(B, L, E, generator=g), torch.randn(B, L, E, generator=g)
    score = torch.rand(B, L, generator=g) + 0.05
    size = torch.randint(1, 4, (B, L), generator=g).float()
    origin = torch.sort(torch.randperm(3 * L, generator=g)[:L]).values.expand(B, L).clone()
    cls = torch.randint(0, L, (B,), generator=g)
    return hidden, residual, score, TokenState(size, origin, cls)


@settings(max_examples=30, deadline=None)
@given(L=st.integers(5, 40), seed=st.integers(0, 10_000), case=st.sampled_from(OPTION_SETS), frac=st.floats(0.01, 1.0))
def test_merge_step_matches_reference(L, seed, case, frac):
    method, switches = case
    opts = merge_options(method, **switches)
    r = max(1, round(frac * ((L - 1) // 2)))
    hidden, residual, score, state = random_state(2, L, 8, seed)
    h, res, out = merge_step(hidden, residual, score, state, r, method, opts)
    assert h.shape == (2, L - r, 8) and res.shape == (2, L - r, 8) and out.size.shape == (2, L - r)
    for b in range(2):
        rh, rres, rsize, rorigin, rcls = reference_step(
            hidden[b], residual[b], score[b], state.size[b], state.origin[b].tolist(), int(state.cls[b]), r, method, opts)
        assert out.origin[b].tolist() == rorigin
        assert int(out.cls[b]) == rcls
        torch.testing.assert_close(out.size[b].double(), rsize)
        torch.testing.assert_close(h[b].double(), rh, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res[b].double(), rres, atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), case=st.sampled_from(OPTION_SETS), steps=st.lists(st.integers(1, 9), min_size=1, max_size=4))
def test_invariants_over_several_steps(seed, case, steps):
    """Token counts follow the schedule, survivors keep their order, the class token survives
    where the state says, sizes add up (merging) and tokens that took nothing are unchanged."""
    method, switches = case
    opts = merge_options(method, **switches)
    L, cls0 = 41, 20
    g = torch.Generator().manual_seed(seed)
    hidden, residual = torch.randn(3, L, 16, generator=g), torch.randn(3, L, 16, generator=g)
    state = start_state(hidden, cls0)
    for r in steps:
        r = min(r, (hidden.shape[1] - 1) // 2)
        score = torch.rand(hidden.shape[:2], generator=g) + 0.05
        before_h, before_origin = hidden, state.origin
        hidden, residual, state = merge_step(hidden, residual, score, state, r, method, opts)
        assert hidden.shape[1] == before_h.shape[1] - r
        assert (state.origin.gather(1, state.cls[:, None]) == cls0).all()      # class token tracked
        if opts.arrangement == "ordered" or method == "prune":
            assert (state.origin.diff(dim=1) > 0).all()                        # original order kept
        else:
            assert (state.cls == (hidden.shape[1] - 1) // 2).all()
        if method == "prune":
            assert (state.size == 1).all()
        else:
            assert (state.size.sum(1) == L).all()                              # sizes conserved
        # A token whose size did not grow absorbed nothing and is copied bit for bit.
        for b in range(3):
            prev = {int(o): k for k, o in enumerate(before_origin[b])}
            for k, o in enumerate(state.origin[b].tolist()):
                if state.size[b, k] == 1:
                    assert torch.equal(hidden[b, k], before_h[b, prev[o]])


@pytest.mark.parametrize("method", ["mame", "tome", "prune"])
def test_batch_independent_and_deterministic(method):
    hidden, residual, score, state = random_state(5, 33, 8, seed=3)
    opts = merge_options(method)
    h, res, out = merge_step(hidden, residual, score, state, 9, method, opts)
    again = merge_step(hidden, residual, score, state, 9, method, opts)
    assert torch.equal(h, again[0]) and torch.equal(res, again[1]) and torch.equal(out.origin, again[2].origin)
    for b in range(5):
        one = TokenState(*(t[b:b + 1] for t in state))
        hb, resb, outb = merge_step(hidden[b:b + 1], residual[b:b + 1], score[b:b + 1], one, 9, method, opts)
        assert torch.equal(outb.origin[0], out.origin[b]) and torch.equal(outb.cls[0], out.cls[b])
        torch.testing.assert_close(hb[0], h[b], atol=1e-6, rtol=0)
        torch.testing.assert_close(resb[0], res[b], atol=1e-6, rtol=0)


def test_ties_are_broken_by_position():
    L, cls = 11, 5  # patches at positions 0-4 and 6-10
    hidden = torch.ones(1, L, 4)  # every token identical: all similarities tie
    score = torch.ones(1, L)      # every informativeness ties
    state = start_state(hidden, cls)
    _, _, out = merge_step(hidden, hidden.clone(), score, state, 3, "mame", merge_options("mame"))
    # Sources: the 5 "lowest" = the first five patches (0-4); the top 3 by position merge.
    assert out.origin[0].tolist() == [3, 4, 5, 6, 7, 8, 9, 10]
    # All of them went to the first destination (position 6), which now stands for 4 patches.
    assert out.size[0].tolist() == [1, 1, 1, 4, 1, 1, 1, 1]
    _, _, pruned = merge_step(hidden, hidden.clone(), score, state, 3, "prune", merge_options("prune"))
    assert pruned.origin[0].tolist() == [3, 4, 5, 6, 7, 8, 9, 10]


def test_weighted_mean_uses_size_times_informativeness():
    # Two patches around a class token; one merge: the source (lower s) folds into the other.
    hidden = torch.tensor([[[1.0, 0.0], [5.0, 5.0], [1.0, 0.1]]])
    score = torch.tensor([[1.0, 9.0, 3.0]])
    state = TokenState(torch.tensor([[2.0, 1.0, 1.0]]), torch.tensor([[0, 1, 2]]), torch.tensor([1]))
    h, _, out = merge_step(hidden, hidden.clone(), score, state, 1, "mame", merge_options("mame"))
    w_src, w_dst = 2.0 * 1.0, 1.0 * 3.0
    torch.testing.assert_close(h[0, 1], (w_src * hidden[0, 0] + w_dst * hidden[0, 2]) / (w_src + w_dst))
    assert out.origin[0].tolist() == [1, 2] and out.size[0].tolist() == [1.0, 3.0] and out.cls.tolist() == [0]
    h, _, _ = merge_step(hidden, hidden.clone(), score, state, 1, "mame", merge_options("mame", weighting="size"))
    torch.testing.assert_close(h[0, 1], (2.0 * hidden[0, 0] + 1.0 * hidden[0, 2]) / 3.0)


@pytest.mark.parametrize("parts", [1, 5, 8, 13, 192])
def test_informativeness_adds_the_parts_in_the_contracts_order(parts):
    """Lane c adds parts c, c + 8, ... in turn from zero, the 8 lanes are added pairwise
    (neighbours first), then scaled: written out with Python floats rounded to float32 at every
    step, the reference must give the same bits (the kernel adds the same way)."""
    from mame_deploy.ops.token_merge.reference import informativeness

    f32 = lambda x: float(np.float32(x))  # noqa: E731
    x = torch.exp(3 * torch.randn(2, parts, 7, generator=torch.Generator().manual_seed(parts)))
    got = informativeness(x, 0.1)
    for b in range(2):
        for t in range(7):
            lanes = [0.0] * 8
            for k in range(parts):
                lanes[k % 8] = f32(lanes[k % 8] + float(x[b, k, t]))
            while len(lanes) > 1:
                lanes = [f32(lanes[i] + lanes[i + 1]) for i in range(0, len(lanes), 2)]
            assert float(got[b, t]) == f32(lanes[0] * f32(0.1)), (b, t)


def test_a_two_dimensional_score_is_one_part():
    hidden, residual, score, state = random_state(3, 21, 8, seed=4)
    opts = merge_options("mame")
    flat = merge_step(hidden, residual, score, state, 5, "mame", opts)
    parts = merge_step(hidden, residual, score[:, None], state, 5, "mame", opts)
    assert torch.equal(flat[0], parts[0]) and torch.equal(flat[2].origin, parts[2].origin)
    halves = merge_step(hidden, residual, torch.stack([score, score], 1), state, 5, "mame", opts, score_scale=0.5)
    assert torch.equal(flat[2].origin, halves[2].origin) and torch.equal(flat[0], halves[0])
    # Two sets of parts (Vim's two scans') are summed as their concatenation, with no copy made.
    two = merge_step(hidden, residual, (score[:, None], score[:, None]), state, 5, "mame", opts, score_scale=0.5)
    assert torch.equal(flat[2].origin, two[2].origin) and torch.equal(flat[0], two[0])


def test_two_score_inputs_sum_as_their_concatenation():
    from mame_deploy.ops.token_merge.reference import informativeness

    hidden, residual, _, state = random_state(2, 21, 8, seed=5)
    parts = torch.rand(2, 13, 21) + 0.01
    want = token_merge_ref(hidden, residual, parts, torch.zeros(2, 1, 21), *state,
                           MergeAttributes(5, lam=1.0, score_scale=0.1))
    for cut in (1, 5, 8, 12):  # the boundary inside a lane's run of parts, and on one
        got = token_merge_ref(hidden, residual, parts[:, :cut], parts[:, cut:], *state,
                              MergeAttributes(5, lam=1.0, score_scale=0.1))
        assert all(torch.equal(g, w) for g, w in zip(got, want)), cut
    assert torch.equal(informativeness(torch.cat([parts, torch.zeros(2, 1, 21)], 1), 0.1), informativeness(parts, 0.1))


# ---------------------------------------------------------------------------------------------
# The patched model


@pytest.mark.parametrize("method", ["mame", "tome", "prune"])
def test_ratio_zero_is_bit_identical(method):
    model = tiny_model()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        mame_deploy.patch(model, ratio=0.0, method=method)
        assert model.mame_schedule == [0] * 4
        assert torch.equal(model(x), ref)


def test_patched_model_follows_schedule_and_is_batch_independent():
    model = tiny_model(depth=5)
    mame_deploy.patch(model, schedule="0:20,2:10,3:8")
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])) for layer in model.layers]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
        assert seen == tokens_per_layer(model.config, model.mame_schedule) == [65, 45, 45, 35, 27]
        for h in hooks:
            h.remove()
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
        assert torch.equal(model(x), out)                        # deterministic
    torch.testing.assert_close(alone, out, atol=1e-5, rtol=1e-5)  # batch-independent
    assert not torch.allclose(out, create_model("vim_t", depth=5, embed_dim=32, img_size=32, patch_size=4)(x))


def test_patch_attributes_and_repatching():
    model = tiny_model()
    keys = list(model.state_dict())
    assert mame_deploy.patch(model, ratio=0.5, method="tome") is model
    assert model.mame_method == "tome" and len(model.mame_schedule) == 4 and sum(model.mame_schedule) == 32
    assert json.loads(json.dumps(model.mame_options)) == model.mame_options
    assert list(model.state_dict()) == keys
    first = model.mame_schedule
    mame_deploy.patch(model, ratio=0.3, layers=[1], lam=0.5)
    assert model.mame_schedule == [0, 19, 0, 0] != first
    assert model.mame_method == "mame" and model.mame_options["lam"] == 0.5 and model.mame_options["layers"] == [1]
    # The recorded options rebuild the same model (what export manifests rely on).
    other = mame_deploy.patch(tiny_model(), ratio=0.3, method=model.mame_method, **model.mame_options)
    assert other.mame_schedule == model.mame_schedule and other.mame_options == model.mame_options


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "evit"}, "unknown merge method 'evit'"),
    ({"ratio": 0.3, "alpha": 1}, "unknown merge option"),
    ({"ratio": 0.3, "split": "random"}, "split must be one of informativeness, alternate"),
    ({"ratio": 0.3, "lam": "x"}, "lam must be a number"),
    ({"ratio": 1.2}, "`ratio` must lie in"),
    ({"ratio": 0.3, "method": "prune", "lam": 1.0}, "option\\(s\\) lam do not apply to prune"),
    ({"schedule": "3:5"}, "merge layer 3 is out of range"),
])
def test_patch_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        mame_deploy.patch(tiny_model(), **kwargs)


def test_recorded_options_rebuild_every_method():
    for method in ("mame", "tome", "prune"):
        model = mame_deploy.patch(tiny_model(), ratio=0.4, method=method)
        again = mame_deploy.patch(tiny_model(), ratio=0.4, method=method, **model.mame_options)
        assert again.mame_options == model.mame_options and again.mame_schedule == model.mame_schedule


def test_patch_refuses_other_modules():
    with pytest.raises(UserError, match="needs a Vision Mamba"):
        mame_deploy.patch(torch.nn.Linear(2, 2), ratio=0.3)


# ---------------------------------------------------------------------------------------------
# ONNX: static shapes, no data-dependent ops, onnxruntime agrees


class TwoSteps(torch.nn.Module):
    def __init__(self, method, opts):
        super().__init__()
        self.method, self.opts = method, opts

    def forward(self, hidden, residual, score):
        state = start_state(hidden, 12)
        hidden, residual, state = merge_step(hidden, residual, score, state, 8, self.method, self.opts)
        hidden, residual, state = merge_step(hidden, residual, score[:, :17], state, 5, self.method, self.opts)
        return hidden, residual, state.size, state.origin, state.cls


def _ort_run(proto, inputs):
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: v.numpy() for i, v in zip(sess.get_inputs(), inputs)})


@pytest.mark.parametrize("method, switches", [("mame", {"lam": 0.5}), ("tome", {}), ("prune", {}),
                                             ("mame", {"metric": "stream", "split": "alternate"})])
def test_merge_steps_export_to_onnx(method, switches):
    from onnx.reference import ReferenceEvaluator

    from mame_deploy.merge import attributes
    from mame_deploy.ops.onnx_functions import attach_functions, inline_functions

    hidden, residual, score, _ = random_state(2, 25, 8, seed=7)
    opts = merge_options(method, **switches)
    module = TwoSteps(method, opts).eval()
    proto = torch.onnx.export(module, (hidden, residual, score), dynamo=True, verbose=False).model_proto
    merges = [node for node in proto.graph.node if (node.domain, node.op_type) == ("mame", "TokenMerge")]
    assert len(merges) == 2                           # one node per step, its attributes the step's
    for node, r in zip(merges, (8, 5)):
        got = {a.name: (a.f if a.type == a.FLOAT else a.i) for a in node.attribute}
        assert got == pytest.approx(attributes(r, method, opts).as_dict())
    attach_functions(proto)
    for out in proto.graph.output:
        assert all(d.HasField("dim_value") for d in out.type.tensor_type.shape.dim)
    inlined = inline_functions(proto)                 # attribute-driven Ifs fold away
    ops = {node.op_type for node in inlined.graph.node}
    assert not ops & {"NonZero", "Loop", "If", "Unique", "GatherElements", "ScatterElements"}, ops
    want = [t.numpy() for t in module(hidden, residual, score)]
    feeds = (hidden, residual, score)
    for model in (proto, inlined):
        for got, ref in zip(_ort_run(model, feeds), want):
            np.testing.assert_allclose(got, ref, atol=1e-6)
    evaluator = ReferenceEvaluator(proto)
    names = [i.name for i in proto.graph.input]
    for got, ref in zip(evaluator.run(None, {n: v.numpy() for n, v in zip(names, feeds)}), want):
        np.testing.assert_allclose(got, ref, atol=1e-6)


def test_patched_model_exports_and_runs_in_onnxruntime():
    from mame_deploy.ops.onnx_functions import attach_functions

    model = mame_deploy.patch(tiny_model(depth=3), ratio=0.5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    assert "NonZero" not in {node.op_type for node in proto.graph.node}
    attach_functions(proto)
    np.testing.assert_allclose(_ort_run(proto, (x,))[0], model(x).detach().numpy(), atol=1e-4, rtol=1e-4)
