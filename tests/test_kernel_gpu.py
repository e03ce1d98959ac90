"""The CUDA selective-scan kernel against the PyTorch reference, on the GPU.

Fresh random inputs for every case; both outputs (``out`` and ``dt_sums``) are poisoned with NaN
first so an element the kernel never wrote fails the check. Error is norm-wise: ||out - ref|| / ||ref|| in float64, with
the reference computed in float32 from the very inputs the kernel saw (half inputs upcast).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mame_deploy.ops.fixtures import relative_error, scan_inputs
from mame_deploy.ops.selective_scan.contract import dt_groups
from mame_deploy.ops.selective_scan.reference import scan_ref_outputs


def _gpu_ready() -> str:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    try:
        from cuda.bindings import driver, nvrtc  # noqa: F401
    except ImportError:
        return "cuda-python (driver + NVRTC) is not installed"
    return ""


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_gpu_ready()), reason=_gpu_ready() or "ready")]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 5e-3}
# (batch, dim, length): B 1..64, D 384/768/1536, L 1..400 with odd and prime lengths and
# lengths on both sides of the kernel's time-chunk size.
SHAPES = [
    (1, 384, 1), (2, 768, 2), (1, 1536, 3), (3, 384, 31), (4, 768, 32), (2, 1536, 33),
    (1, 768, 97), (5, 384, 99), (2, 768, 197), (7, 1536, 101), (64, 768, 197), (16, 384, 256),
    (3, 768, 389), (2, 1536, 400), (33, 384, 7), (64, 1536, 61),
    (1, 768, 197), (1, 384, 256), (1, 100, 197),  # batch 1: the segmented splits (100: partial block)
]
_seed = itertools.count(1234)


def make_inputs(batch, dim, length, dstate=16, dtype=torch.float32, softplus=True):
    return scan_inputs(batch, dim, length, dstate, dtype, softplus, seed=next(_seed))


def reference(args, softplus, reverse):
    """(out, dt_sums) of the reference on the kernel's very inputs, upcast."""
    up = {k: (v.float() if v is not None else None) for k, v in args.items()}
    return scan_ref_outputs(**up, delta_softplus=softplus, reverse=reverse)


def run_kernel(args, softplus, reverse, **kw):
    """(out, dt_sums) from the kernel, both NaN-poisoned before the launch."""
    from mame_deploy.ops.selective_scan.cuda import selective_scan_cuda

    batch, dim, length = args["u"].shape
    out = torch.full_like(args["u"], float("nan"))
    dt_sums = torch.full((batch, dt_groups(dim), length), float("nan"), device="cuda")
    selective_scan_cuda(**args, delta_softplus=softplus, reverse=reverse, out=out, dt_sums=dt_sums, **kw)
    torch.cuda.synchronize()
    return out, dt_sums


def check(args, softplus, reverse, dtype_name, **kw):
    """Both outputs against the reference; dt_sums (float32 from the same delta) to 1e-5 in
    every dtype. Returns the kernel's dt_sums."""
    got = run_kernel(args, softplus, reverse, **kw)
    for name, value, ref, tol in zip(("out", "dt_sums"), got, reference(args, softplus, reverse),
                                     (TOL[dtype_name], 1e-5)):
        assert not torch.isnan(value).any(), f"some of {name} was never written (NaN poison left)"
        assert torch.isfinite(ref).all()
        err = relative_error(value, ref)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"
    return got[1]


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference(shape, dtype_name, reverse):
    args = make_inputs(*shape, dtype=DTYPES[dtype_name])
    check(args, True, reverse, dtype_name)


@pytest.mark.parametrize("dstate", [8, 32])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_other_state_sizes(dstate, dtype_name):
    for reverse in (False, True):
        check(make_inputs(3, 768, 131, dstate=dstate, dtype=DTYPES[dtype_name]), True, reverse, dtype_name)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_without_softplus_and_optional_inputs(dtype_name):
    args = make_inputs(2, 384, 77, dtype=DTYPES[dtype_name], softplus=False)
    check(args, False, False, dtype_name)
    for missing in ("D", "z", "delta_bias"):
        partial = dict(args, **{missing: None})
        check(partial, False, True, dtype_name)


def test_unsupported_state_size_fails_clearly():
    from mame_deploy.errors import UserError

    args = make_inputs(1, 384, 5, dstate=12)
    with pytest.raises(UserError, match="d_state"):
        run_kernel(args, True, False)


def test_op_dispatches_to_kernel_on_cuda_and_handles_views():
    """torch.ops.mame.selective_scan on CUDA tensors runs the kernel (non-contiguous z and
    delta, as the model passes them, included) and equals the direct launch bit for bit."""
    args = make_inputs(4, 768, 197)
    xz = torch.randn(4, 197, 2 * 768, device="cuda").transpose(1, 2)  # (B, 2D, L) view
    args["z"] = xz[:, 768:]
    args["delta"] = (0.5 * torch.randn(4, 197, 768, device="cuda")).transpose(1, 2)
    assert not args["z"].is_contiguous() and not args["delta"].is_contiguous()
    order = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    got = torch.ops.mame.selective_scan(*(args[k] for k in order), True, True)
    direct = run_kernel(args, True, True)
    assert all(torch.equal(g, d) for g, d in zip(got, direct, strict=True))
    assert relative_error(got[0], reference(args, True, True)[0]) < 1e-5


def test_kernel_in_a_cuda_graph():
    from mame_deploy.ops.selective_scan.cuda import selective_scan_cuda

    args = make_inputs(8, 768, 197)
    out, dt_sums = selective_scan_cuda(**args, delta_softplus=True)  # warm-up: compile and load
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        selective_scan_cuda(**args, delta_softplus=True, out=out, dt_sums=dt_sums)
    fresh = make_inputs(8, 768, 197)
    for name, t in args.items():
        t.copy_(fresh[name])
    out.fill_(float("nan"))
    dt_sums.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    want = reference(fresh, True, False)
    assert relative_error(out, want[0]) < 1e-5 and relative_error(dt_sums, want[1]) < 1e-5


def test_repeated_runs_are_identical():
    """No races: the same inputs give bit-identical outputs run after run."""
    args = make_inputs(64, 768, 197, dtype=torch.float16)
    first = run_kernel(args, True, False)
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(run_kernel(args, True, False), first, strict=True))


TUNINGS = ["4x32x32x4", "16x8x32x1", "8x16x32x2", "8x8x64x1", "16x4x32x1", "2x64x32x1",
           # time segments (one chunk each, or restaged when the sequence is longer than they
           # cover); lengths shorter than, equal to and not a multiple of the segment count
           "16x2x32x3x8", "16x2x32x4x4", "16x1x16x3x16", "16x2x16x3x8", "8x4x32x2x4", "4x8x16x2x4",
           "16x8x16x1x2"]


@pytest.mark.parametrize("tuning", TUNINGS)
def test_other_tunings_compute_the_same_function(tuning):
    """The benchmark compares work splits; each must be correct before it is timed, and each
    writes dt_sums bit for bit as the default split does (whole groups from the tile, or
    recomputed by the block that starts a group), so the merge decides alike whatever the split."""
    from mame_deploy.plugins.launch import DEFAULT_TUNING, Tuning

    for (batch, dim, length), dtype_name, reverse in (
        ((3, 768, 197), "float32", False), ((3, 768, 197), "float16", True), ((1, 384, 3), "float32", True),
        ((2, 384, 8), "bfloat16", False), ((1, 1536, 400), "float32", False),
        ((1, 37, 50), "float32", True),  # channels not a multiple of the block's
    ):
        args = make_inputs(batch, dim, length, dtype=DTYPES[dtype_name])
        dt_sums = check(args, True, reverse, dtype_name, tuning=Tuning.parse(tuning))
        assert torch.equal(dt_sums, run_kernel(args, True, reverse, tuning=DEFAULT_TUNING)[1])


def test_vim_forward_with_kernel_matches_reference():
    from mame_deploy.models import create_model

    model = create_model("vim_t", depth=2).cuda()
    images = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        got = model(images)  # mame::selective_scan -> kernel
        import mame_deploy.models.vim as vim

        original = vim.selective_scan
        vim.selective_scan = lambda *a: scan_ref_outputs(*a)
        try:
            ref = model(images)
        finally:
            vim.selective_scan = original
    assert relative_error(got, ref) < 1e-4
