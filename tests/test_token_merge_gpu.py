"""The token-merge CUDA kernel against ``token_merge_ref`` on the GPU (skips elsewhere).

Every method and option of the contract, every stream dtype pair, every work split; outputs
poisoned first (NaN, or -7 for the integer outputs) so that an unwritten element fails. Decisions
(which tokens leave, where they go) must be identical: origin_out and cls_out equal, sizes equal;
values to 1e-5 relative (float32) or 5e-3 (half types), norm-wise.
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("cuda.bindings.driver", reason="needs cuda-python (pip install 'mame-deploy[gpu]')")

from mame_deploy.errors import UserError  # noqa: E402
from mame_deploy.ops.token_merge.contract import MergeAttributes  # noqa: E402
from mame_deploy.ops.fixtures import merge_inputs, same_bits  # noqa: E402
from mame_deploy.ops.token_merge.cuda import register_cuda, token_merge_cuda  # noqa: E402
from mame_deploy.ops.token_merge.reference import decision_key, informativeness, token_merge_ref  # noqa: E402
from mame_deploy.plugins import merge_launch  # noqa: E402

pytestmark = pytest.mark.gpu
torch.backends.cuda.matmul.allow_tf32 = False  # the reference's similarity in true float32

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-3}
DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float32), (torch.bfloat16, torch.float32)]
METHODS = {
    "mame": MergeAttributes(6, lam=1.0),
    "mame-vim-scale": MergeAttributes(6, lam=1.0, score_scale=0.5 / 768),
    "mame-lam0": MergeAttributes(6),
    "mame-lam2.5": MergeAttributes(6, lam=2.5),
    "split-alternate": MergeAttributes(6, split=1, lam=1.0),
    "concat": MergeAttributes(6, arrangement=1, lam=1.0),
    "weighting-size": MergeAttributes(6, weighting=1, lam=1.0),
    "metric-stream": MergeAttributes(6, metric=1, lam=1.0),
    "tome": MergeAttributes(6, split=1, arrangement=1, weighting=1),
    "prune": MergeAttributes(6, prune=1),
    "prune-concat": MergeAttributes(6, prune=1, arrangement=1),
    "r-max": MergeAttributes(98, lam=1.0),
    "r-max-tome": MergeAttributes(98, split=1, arrangement=1, weighting=1),
}


def all_parts(args) -> torch.Tensor:
    """The score parts of both inputs in the contract's order (their concatenation)."""
    return torch.cat([args["score"], args["score_b"]], dim=1)


def poisoned(B, L, E, r, hidden_dtype, residual_dtype):
    Q = L - r
    nan = float("nan")
    return (torch.full((B, Q, E), nan, device="cuda", dtype=hidden_dtype),
            torch.full((B, Q, E), nan, device="cuda", dtype=residual_dtype),
            torch.full((B, Q), nan, device="cuda"),
            torch.full((B, Q), -7, device="cuda", dtype=torch.long),
            torch.full((B,), -7, device="cuda", dtype=torch.long))


def run_kernel(args, attrs, tuning=None):
    B, L, E = args["hidden"].shape
    out = poisoned(B, L, E, attrs.r, args["hidden"].dtype, args["residual"].dtype)
    got = token_merge_cuda(**args, attrs=attrs, tuning=tuning, out=out)
    torch.cuda.synchronize()
    return got


def rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


def check_against_reference(got, want, dtypes, label):
    h, res, size, origin, cls = got
    assert torch.isfinite(h.float()).all() and torch.isfinite(res.float()).all(), f"{label}: unwritten rows"
    assert torch.isfinite(size).all() and (origin >= 0).all() and (cls >= 0).all(), f"{label}: unwritten state"
    bad = (origin != want[3]).any(dim=1) | (cls != want[4])
    assert not bad.any(), f"{label}: decisions differ in samples {bad.nonzero().flatten().tolist()}"
    torch.testing.assert_close(size, want[2], rtol=1e-6, atol=0)
    for x, w, dt, name in ((h, want[0], dtypes[0], "hidden"), (res, want[1], dtypes[1], "residual")):
        err = rel_err(x, w)
        assert err < TOLERANCE[dt], f"{label}: {name} relative error {err:.2e}"
    return max(rel_err(h, want[0]), rel_err(res, want[1]))


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
@pytest.mark.parametrize("method", list(METHODS))
def test_kernel_matches_the_reference(method, dtypes):
    attrs = METHODS[method]
    args = merge_inputs(8, 197, 384, *dtypes, seed=list(METHODS).index(method))
    want = token_merge_ref(**args, attrs=attrs)
    results = [run_kernel(args, attrs, tuning) for tuning in merge_launch.TUNINGS]
    err = check_against_reference(results[0], want, dtypes, f"{method} {dtypes}")
    for tuning, other in zip(merge_launch.TUNINGS[1:], results[1:]):
        assert same_bits(results[0], other), f"split {tuning} gives other bits than {merge_launch.TUNINGS[0]}"
    print(f"\n{method} {dtypes}: worst relative error {err:.2e}")


# Thread layouts of the matching beyond the shipped splits: the tile on part of the block with the
# norms on other warps, the norms on the first threads while fewer threads match (their rows
# overlap the tile's threads), every thread matching with an unrolled and a plain loop.
LAYOUTS = ("16x8x4x2x64x1x4x256x128", "8x8x4x4x64x1x2x256x128", "1x16x7x4x16x2x1x256x128",
           "4x8x4x1x64x1x2", "2x16x7x4x16x2x2")


@pytest.mark.parametrize("method", ["mame", "tome", "metric-stream"])
def test_every_matching_layout_gives_the_same_bits(method):
    attrs = METHODS[method]
    args = merge_inputs(3, 197, 384, torch.bfloat16, torch.float32, seed=41)
    want = run_kernel(args, attrs, merge_launch.DEFAULT_TUNING)
    for text in LAYOUTS:
        assert same_bits(run_kernel(args, attrs, merge_launch.Tuning.parse(text)), want), f"split {text}"


@pytest.mark.parametrize("split", [0, 1])
def test_r0_with_concat_only_reorders(split):
    """r = 0 removes nothing; the concatenated arrangement still puts the sources first and the
    class token in the middle (the reference cannot run r = 0 with matching: its group argmax
    reduces over an empty axis, so the expected result is built here)."""
    args = merge_inputs(4, 197, 384, seed=9)
    got = run_kernel(args, MergeAttributes(0, split=split, arrangement=1))
    n = 196
    for b in range(4):
        cls = int(args["cls"][b])
        seq = [k + (k >= cls) for k in range(n)]
        if split:
            sources = [k for k in range(n) if k % 2 == 0]
        else:
            key = decision_key(informativeness(all_parts(args), 1.0))[b, seq].tolist()
            rank = sorted(range(n), key=lambda k: (key[k], k))
            sources = sorted(rank[: n // 2])
        order = [seq[k] for k in sources] + [seq[k] for k in range(n) if k not in set(sources)]
        order.insert(n // 2, cls)
        idx = torch.tensor(order, device="cuda")
        assert int(got[4][b]) == n // 2
        assert torch.equal(got[3][b], args["origin"][b, idx])
        assert torch.equal(got[0][b], args["hidden"][b, idx]) and torch.equal(got[1][b], args["residual"][b, idx])
        assert torch.equal(got[2][b], args["size"][b, idx])


@pytest.mark.parametrize("shape", [(3, 65, 192), (2, 129, 64), (5, 300, 96), (1, 513, 32), (4, 9, 8), (2, 3, 4),
                                   (2, 513, 4096)])
@pytest.mark.parametrize("method", ["mame", "tome", "prune", "concat"])
def test_other_shapes(shape, method):
    B, L, E = shape
    base = METHODS[method]
    attrs = MergeAttributes(min(base.r, (L - 1) // 2), base.prune, base.split, base.arrangement, base.weighting,
                            base.metric, base.lam, base.score_scale)
    args = merge_inputs(B, L, E, seed=L, parts=(1, 3, 11, 192, 200)[L % 5])
    want = token_merge_ref(**args, attrs=attrs)
    for tuning in merge_launch.TUNINGS:
        check_against_reference(run_kernel(args, attrs, tuning), want, (torch.float32,) * 2, f"{shape} {method}")


def tied_inputs(kind: str, B=6, L=197, E=384):
    """Exact ties (duplicate tokens, equal scores) and near-ties (differences below float16's
    spacing, which the decision keys round away)."""
    args = merge_inputs(B, L, E, seed=11)
    args["score_b"] = torch.zeros_like(args["score"][:, :1])  # the whole score in one input: zeros add nothing
    h, score = args["hidden"], args["score"]
    g = torch.Generator(device="cuda").manual_seed(3)
    if kind == "duplicate-tokens":  # every token repeated 4 times: tied similarities, tied best matches
        h.copy_(h[:, torch.arange(L, device="cuda") // 4 * 4])
    elif kind == "equal-scores":  # few distinct scores (equal parts, so equal sums): the split and lam ranking tie
        score.copy_(torch.randint(1, 4, (B, 1, L), generator=g, device="cuda").float().expand_as(score) * 0.01)
    elif kind == "near-tie-scores":  # equal up to float32 noise far below float16's spacing
        score.copy_(0.05 + 1e-9 * torch.randn(score.shape, generator=g, device="cuda"))
    elif kind == "near-tie-tokens":  # tokens equal up to 1e-6 noise: similarities tie after rounding
        h.copy_(h[:, :1] + 1e-6 * torch.randn(h.shape, generator=g, device="cuda"))
    elif kind == "all-equal":  # everything ties: positions decide
        h.copy_(h[:, :1].expand_as(h))
        score.fill_(0.02)
    return args


@pytest.mark.parametrize("kind", ["duplicate-tokens", "equal-scores", "near-tie-scores", "near-tie-tokens", "all-equal"])
@pytest.mark.parametrize("method", ["mame", "mame-lam0", "tome", "prune", "concat", "metric-stream"])
def test_ties_resolve_like_the_reference(kind, method):
    attrs = METHODS[method]
    args = tied_inputs(kind)
    want = token_merge_ref(**args, attrs=attrs)
    for tuning in merge_launch.TUNINGS:
        check_against_reference(run_kernel(args, attrs, tuning), want, (torch.float32,) * 2, f"{kind} {method}")


def midpoint_scores(B=8, L=197, K=192, seed=21):
    """Score parts whose sums lie on float16 rounding midpoints up to float32 rounding, so that
    the order of the adds decides which way many decision keys round. Two midpoints, 120 tokens
    on the lower: which of those are pruned first, and which become sources, follows the bits."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    lows = torch.tensor([0.25, 0.25 + 2 ** -12], device="cuda")  # adjacent float16 values...
    highs = torch.tensor([0.5, 0.5 + 2 ** -11], device="cuda")
    low_mid, high_mid = lows.mean(), highs.mean()                  # ... and the midpoints between them
    on_low = torch.rand(B, 1, L, generator=g, device="cuda").argsort(dim=2) < 120
    target = torch.where(on_low, low_mid, high_mid)
    parts = target / K * (1 + 1e-6 * torch.randn(B, K, L, generator=g, device="cuda"))
    return parts


def test_score_parts_add_up_in_the_contracts_order():
    """The kernel sums the score's parts in the reference's order, bit for bit: on inputs where
    another order (torch.sum's) rounds keys the other way, decisions still match the reference."""
    args = merge_inputs(8, 197, 384, seed=21)
    parts = midpoint_scores()
    args["score"], args["score_b"] = parts[:, :101].contiguous(), parts[:, 101:].contiguous()  # as two scans'
    ours = decision_key(informativeness(parts, 1.0))
    other = decision_key(parts.sum(dim=1))
    assert (ours != other).sum() > 50, "the inputs must be sensitive to the order of the adds"
    for attrs in (MergeAttributes(98, prune=1), METHODS["mame"], METHODS["mame-lam0"]):
        want = token_merge_ref(**args, attrs=attrs)
        for tuning in merge_launch.TUNINGS:
            check_against_reference(run_kernel(args, attrs, tuning), want, (torch.float32,) * 2, f"midpoints {attrs}")


@pytest.mark.parametrize("method", ["mame", "mame-lam0", "tome", "prune"])
def test_nan_inputs_stay_contained(method):
    """A NaN score part (one token's, a whole sample's) or a NaN hidden row -- a broken upstream
    layer -- must not send the kernel out of bounds or into other samples: every state output
    written, each sample's tokens kept at most once, a clean sample's result as if alone, and
    the same bits on every split (NaN keys rank first in the descending rank and last in the
    ascending one, as torch.sort puts them)."""
    attrs = METHODS[method]
    args = merge_inputs(4, 197, 384, seed=31)
    args["score"][0, :, 5] = float("nan")
    args["score"][1] = float("nan")
    args["hidden"][2, 7] = float("nan")
    outs = [run_kernel(args, attrs, tuning) for tuning in merge_launch.TUNINGS]
    for tuning, other in zip(merge_launch.TUNINGS[1:], outs[1:]):
        assert same_bits(outs[0], other), f"split {tuning} gives other bits on NaN inputs"
    _, _, size, origin, cls = outs[0]
    assert torch.isfinite(size).all() and (cls >= 0).all() and (cls < 197 - attrs.r).all()
    assert (origin >= 0).all() and all(o.unique().numel() == o.numel() for o in origin)
    alone = run_kernel({k: v[3:] for k, v in args.items()}, attrs)
    assert same_bits(alone, tuple(t[3:] for t in outs[0])), "NaNs in other samples changed a clean one"


@pytest.mark.parametrize("method", ["mame", "tome", "prune"])
def test_a_sample_alone_equals_it_in_a_batch_and_runs_repeat(method):
    attrs = METHODS[method]
    args = merge_inputs(64, 197, 384, torch.bfloat16, torch.float32, seed=5)
    batch = run_kernel(args, attrs)  # batch 64: its own work split
    assert same_bits(batch, run_kernel(args, attrs)), "two runs differ"
    for i in (0, 17, 63):
        alone = run_kernel({k: v[i:i + 1] for k, v in args.items()}, attrs)  # batch 1: another split
        assert same_bits(alone, tuple(t[i:i + 1] for t in batch)), f"sample {i} alone differs from it in the batch"


def test_small_batches_take_the_16_block_cluster_where_it_fits():
    from mame_deploy.ops.token_merge import cuda

    variant = merge_launch.Variant("float32", "float32", 256)
    chosen = cuda.default_tuning(torch.device("cuda", torch.cuda.current_device()), variant, 1)
    if torch.cuda.get_device_capability()[0] >= 9 and torch.cuda.get_device_properties(0).multi_processor_count >= 64:
        assert chosen == merge_launch.TINY_BATCH_TUNING  # H100 / H200: a GPC holds 16 blocks
    else:
        assert chosen.portable
    args = merge_inputs(1, 197, 384, seed=9)
    assert same_bits(run_kernel(args, METHODS["mame"]), run_kernel(args, METHODS["mame"], merge_launch.SMALL_BATCH_TUNING))


@pytest.mark.parametrize("method", ["mame", "prune"])
def test_the_step_timeline_reads_the_kernels_own_clocks(tmp_path, method):
    import json
    import subprocess
    import sys
    from pathlib import Path

    # In its own process: the traced build sits in the launcher's cache under the plain key.
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_merge.py"
    out = tmp_path / "timeline.json"
    run = subprocess.run([sys.executable, str(script), "timeline", "--batch", "1", "--rounds", "3", "--graph",
                          "--method", method, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    reached = [m["us_from_start"] for m in result["marks"] if m["us_from_start"] is not None]
    skipped = {m["mark"] for m in result["marks"] if m["us_from_start"] is None}
    assert skipped == (set() if method == "mame" else {14, 15})  # pruning stages no channels
    assert reached == sorted(reached) and 0 < reached[-1] < 1000  # phases in program order, a step in us
    assert result["gap_us"] >= 0


def test_the_op_runs_the_kernel_on_cuda_and_graphs_capture_it():
    from mame_deploy.ops.token_merge.contract import ATTRIBUTES
    from mame_deploy.runners import capture_cuda_graph

    register_cuda()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mame::token_merge", "CUDA")
    attrs = METHODS["mame"]
    args = merge_inputs(4, 197, 384, seed=2)
    values = attrs.as_dict()

    def op():
        return torch.ops.mame.token_merge(*args.values(), *(values[a] for a in ATTRIBUTES))

    direct = run_kernel(args, attrs)
    assert same_bits(op(), direct)
    graph, captured = capture_cuda_graph(op)
    for t in args.values():
        t.copy_(t.roll(1, dims=0))
    graph.replay()
    torch.cuda.synchronize()
    assert same_bits(captured, run_kernel(args, attrs))


def test_the_op_falls_back_to_the_reference_where_the_kernel_cannot_run():
    register_cuda()
    args = merge_inputs(2, 600, 8, seed=1)  # longer than the decision arrays hold
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = torch.ops.mame.token_merge(*args.values(), 6, 0, 0, 0, 0, 0, 1.0, 1.0)
    assert any("runs the PyTorch reference" in str(w.message) for w in seen)
    want = token_merge_ref(**args, attrs=MergeAttributes(6, lam=1.0))
    assert same_bits(got, want)
    with pytest.raises(UserError, match="at most 513 tokens"):
        token_merge_cuda(**args, attrs=MergeAttributes(6))


def test_a_merged_vim_hands_both_scans_scores_to_the_kernel(monkeypatch):
    """The model passes its two scans' dt_sums as the operator's two score inputs; the kernel
    (no fallback: its warning is an error here) decides every step as the reference does on the
    same scores."""
    import mame_deploy
    import mame_deploy.merge as merge_module
    from mame_deploy.models import create_model

    model = mame_deploy.patch(create_model("vim_t", depth=6, seed=5).cuda().eval(), ratio=0.5)
    images = torch.randn(2, 3, 224, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(6))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        model.token_merge.trace = {}
        got, kernel_steps = model(images), model.token_merge.trace
        monkeypatch.setattr(merge_module, "token_merge", token_merge_ref)
        model.token_merge.trace = {}
        want, reference_steps = model(images), model.token_merge.trace
    assert len(kernel_steps) == len(model.token_merge.layers) >= 2
    for layer, (origin, size) in reference_steps.items():
        assert torch.equal(kernel_steps[layer][0], origin) and torch.equal(kernel_steps[layer][1], size), layer
    assert ((got - want).norm() / want.norm()).item() < 1e-5
