"""The token-merge kernel's contract without a GPU: argument order (TensorRT's AOT convention),
launch geometry on symbolic batches, work splits and variants, the plugin's AOT computation,
an nvcc compile of every split (no spills) and an NVRTC compile where cuda-python exists."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from shape_expr import Sym, evaluate

from mame_deploy.errors import UserError
from mame_deploy.ops.token_merge.contract import INPUT_NAMES, OUTPUT_NAMES, MergeAttributes
from mame_deploy.plugins import merge_launch


def test_kernel_args_follow_tensorrts_aot_order_and_the_source():
    args = merge_launch.KERNEL_ARGS
    assert args[: len(INPUT_NAMES)] == INPUT_NAMES and args[-len(OUTPUT_NAMES):] == OUTPUT_NAMES
    assert all(merge_launch.KERNEL_ARG_TYPES[n] == "int32" for n in args[len(INPUT_NAMES):-len(OUTPUT_NAMES)])
    source = merge_launch.KERNEL_SOURCE.read_text()
    start = source.index("TM_KERNEL_NAME(\n")
    signature = re.sub(r"//[^\n]*", "", source[start: source.index("{", start)])
    names = re.findall(r"(\w+)\s*[,)]", signature)
    renamed = {"prune_flag": "prune"}
    assert tuple(renamed.get(n, n) for n in names) == args
    assert "#include" not in source


@pytest.mark.parametrize("tuning", merge_launch.TUNINGS, ids=str)
def test_launch_params_on_symbolic_batches_match_ints(tuning):
    symbolic = merge_launch.launch_params(Sym.var("b"), tuning)
    for b in (1, 7, 256):
        ints = merge_launch.launch_params(b, tuning)
        assert tuple(evaluate(x, {"b": b}) for x in symbolic.grid) == ints.grid == (b * tuning.cluster, 1, 1)
        assert symbolic.block == ints.block == (tuning.threads, 1, 1) and symbolic.shared_mem == 0


def test_tuning_for_batch_and_the_symbolic_default():
    assert merge_launch.tuning_for(1) == merge_launch.tuning_for(4) == merge_launch.TINY_BATCH_TUNING
    assert merge_launch.tuning_for(1, portable=True) == merge_launch.tuning_for(5) == merge_launch.SMALL_BATCH_TUNING
    assert merge_launch.tuning_for(64) == merge_launch.MEDIUM_BATCH_TUNING
    assert merge_launch.tuning_for(256) == merge_launch.DEFAULT_TUNING
    assert merge_launch.tuning_for(Sym.var("b")) == merge_launch.DEFAULT_TUNING
    for tuning in merge_launch.TUNINGS + (merge_launch.Tuning(cluster=4, dst_groups=2, ty=16, threads=512),):
        assert merge_launch.Tuning.parse(str(tuning)) == tuning


def test_match_threads_select_the_tile_threads_and_reach_the_kernel():
    tuning = merge_launch.Tuning.parse("16x8x4x2x64x1x4x256x128")
    assert (tuning.threads, tuning.match_threads, tuning.matchers) == (256, 128, 128)
    assert merge_launch.Tuning().matchers == 256  # 0: every thread matches
    opts = merge_launch.compile_options(merge_launch.Variant("float32", "float32"), tuning)
    assert "-DTM_MATCH_THREADS=128" in opts and "-DTM_THREADS=256" in opts
    assert "-DTM_MATCH_THREADS=256" in merge_launch.compile_options(merge_launch.Variant("float32", "float32"))


@pytest.mark.parametrize("call, message", [
    (lambda: merge_launch.Tuning(cluster=3), "cluster must be 1, 2, 4, 8 or 16"),
    (lambda: merge_launch.Tuning(ty=16, my=9, mx=9), "must be at most threads"),
    (lambda: merge_launch.Tuning(ty=4), "at most 32 threads per source row"),
    (lambda: merge_launch.Tuning(threads=200), "multiple of 32 in 128..1024"),
    (lambda: merge_launch.Tuning(cluster=8, dst_groups=3), "dst_groups must divide cluster"),
    (lambda: merge_launch.Tuning(kt=12), "multiple of 8"),
    (lambda: merge_launch.Tuning(ty=8, my=3), "whole 16 x 8 tensor-core pieces"),  # 24 sources a pass
    (lambda: merge_launch.Tuning(ty=64, my=1, mx=1), "(match_threads / ty) * mx a multiple of 8"),  # 4 destinations
    (lambda: merge_launch.Tuning(match_threads=48), "match_threads must be 0 (all) or a multiple of 32"),
    (lambda: merge_launch.Tuning(match_threads=512), "match_threads must be 0 (all) or a multiple of 32"),
    (lambda: merge_launch.Tuning(ty=64, my=1, mx=1, match_threads=96), "ty must divide match_threads"),
    (lambda: merge_launch.Tuning.parse("1x2"), "CLUSTERxTYxMYxMXxKTxMIN_BLOCKS"),
    (lambda: merge_launch.Variant("float64", "float64"), "no 'float64' hidden"),
    (lambda: merge_launch.Variant("float16", "bfloat16"), "float32 residual or one in hidden's type"),
    (lambda: merge_launch.n_cap(600), "at most 513 tokens"),
    (lambda: merge_launch.check_shape(197, 382, 6), "multiple of 4"),
    (lambda: merge_launch.check_shape(197, 4100, 6), "at most 4096"),
    (lambda: merge_launch.check_shape(197, 384, 99), "r=99 must lie in 0..98"),
    (lambda: merge_launch.check_shape(197, 384, 6, 0), "positive number of score parts"),
    (lambda: merge_launch.check_shape(197, 384, 6, 40000, 30000), "at most 65536 score parts"),
])
def test_bad_variants_fail_with_one_line(call, message):
    with pytest.raises(UserError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan")])
def test_score_scale_must_be_positive_and_finite(scale):
    with pytest.raises(ValueError, match="score_scale must be a positive finite number"):
        MergeAttributes(6, score_scale=scale)


def test_attributes_are_int32_scalars_with_the_floats_as_their_bits():
    import struct

    bits = lambda x: struct.unpack("<i", struct.pack("<f", x))[0]  # noqa: E731
    values = merge_launch.attribute_scalars(MergeAttributes(6, 1, 1, 1, 1, 1, -2.5, 0.1))
    assert values == dict(r=6, prune=1, split=1, arrangement=1, weighting=1, metric=1, lam_bits=bits(-2.5),
                          score_scale_bits=bits(0.1))
    defaults = merge_launch.attribute_scalars(MergeAttributes(6))
    assert defaults["lam_bits"] == 0 and defaults["score_scale_bits"] == bits(1.0)


def test_aot_kernel_is_the_same_for_ints_and_shape_expressions(monkeypatch):
    from mame_deploy.plugins import trt_token_merge

    seen = []
    monkeypatch.setattr(merge_launch, "compile_ptx", lambda v, t, arch=None: seen.append(t) or (b"ptx", "k"))
    attrs = MergeAttributes(6, lam=1.0)
    for tactic in (0,) + trt_token_merge.tactics():
        symbolic = trt_token_merge.aot_kernel("float32", "float32", Sym.var("b"), 197, 384, 96, 96, attrs, tactic)
        static = trt_token_merge.aot_kernel("float32", "float32", 64, 197, 384, 96, 96, attrs, tactic)
        tuning = seen[-1]
        assert tuple(evaluate(x, {"b": 64}) for x in symbolic.grid) == (64 * seen[-2].cluster, 1, 1)
        assert static.grid == (64 * tuning.cluster, 1, 1)
        assert tuple(evaluate(x, {"b": 64}) for x in symbolic.scalars) == static.scalars
        assert static.scalars[:6] == (64, 197, 384, 96, 96, 6)
    assert seen[0] == merge_launch.DEFAULT_TUNING and seen[1] == merge_launch.MEDIUM_BATCH_TUNING
    assert seen[2:] == [t for t in merge_launch.PORTABLE_TUNINGS for _ in range(2)]
    # TensorRT's launch cannot allow a 16-block cluster: batch 1's tactic 0 is the 8-block split.
    trt_token_merge.aot_kernel("float32", "float32", 1, 197, 384, 96, 96, attrs, 0)
    assert seen[-1] == merge_launch.SMALL_BATCH_TUNING
    with pytest.raises(ValueError, match="no tactic 9"):
        trt_token_merge.aot_kernel("float32", "float32", 1, 197, 384, 96, 96, attrs, 9)
    with pytest.raises(UserError, match="static sequence length"):
        trt_token_merge.aot_kernel("float32", "float32", 1, Sym.var("L"), 384, 96, 96, attrs)


def test_only_portable_clusters_are_tensorrt_tactics():
    from mame_deploy.plugins import trt_token_merge

    assert not merge_launch.TINY_BATCH_TUNING.portable and merge_launch.TINY_BATCH_TUNING in merge_launch.TUNINGS
    assert all(t.portable for t in merge_launch.PORTABLE_TUNINGS)
    assert set(merge_launch.TUNINGS) - set(merge_launch.PORTABLE_TUNINGS) == {merge_launch.TINY_BATCH_TUNING}
    assert [trt_token_merge.tuning_of(t, 1) for t in trt_token_merge.tactics()] == list(merge_launch.PORTABLE_TUNINGS)


@pytest.mark.parametrize("fits", [True, False])
def test_default_tuning_falls_back_where_a_large_cluster_cannot_be_placed(monkeypatch, fits):
    import torch

    from mame_deploy.ops.token_merge import cuda

    monkeypatch.setattr(cuda, "_cluster_fits", lambda *args: fits)
    variant = merge_launch.Variant("float32", "float32")
    chosen = cuda.default_tuning(torch.device("cuda", 0), variant, 1)
    assert chosen == (merge_launch.TINY_BATCH_TUNING if fits else merge_launch.SMALL_BATCH_TUNING)
    assert cuda.default_tuning(torch.device("cuda", 0), variant, 256) == merge_launch.DEFAULT_TUNING


def test_autotune_type_combinations_pair_each_stream_with_its_output():
    from mame_deploy.plugins.trt_token_merge import io_type_combinations

    same, mixed = (c.split(", ") for c in io_type_combinations())
    names = INPUT_NAMES + OUTPUT_NAMES
    assert len(same) == len(mixed) == len(names)
    at = dict(zip(names, mixed))
    assert at["hidden"] == at["hidden_out"] == "FP16|BF16" and at["residual"] == at["residual_out"] == "FP32"
    assert dict(zip(names, same))["origin"] == "INT64"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("tuning", merge_launch.TUNINGS, ids=str)
@pytest.mark.parametrize("dtypes", [("float32", "float32"), ("bfloat16", "float32"), ("float16", "float16")])
def test_nvcc_compiles_every_split_without_spills(tmp_path, tuning, dtypes):
    variant = merge_launch.Variant(*dtypes, n_cap=512)
    opts = merge_launch.compile_options(variant, tuning)
    cmd = ["nvcc", "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), *opts,
           str(merge_launch.KERNEL_SOURCE)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "0 bytes spill stores" in result.stderr, result.stderr
    smem = int(re.search(r"(\d+) bytes smem", result.stderr).group(1))
    assert smem <= 48 * 1024  # static only: TensorRT cannot opt a kernel in to more


def _has_nvrtc() -> bool:
    try:
        from cuda.bindings import nvrtc

        return nvrtc.nvrtcVersion()[0] == nvrtc.nvrtcResult.NVRTC_SUCCESS
    except Exception:
        return False


@pytest.mark.skipif(not _has_nvrtc(), reason="cuda-python with NVRTC is not installed")
def test_nvrtc_ptx_declares_the_cluster_and_the_parameters():
    from mame_deploy.plugins import nvrtc

    ptx, name = merge_launch.compile_ptx(merge_launch.Variant("bfloat16", "float32"),
                                         merge_launch.SMALL_BATCH_TUNING, arch="sm_90")
    entry = re.search(rb"\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.S)
    assert entry.group(1).decode() == name
    params = re.findall(rb"\.param\s+\.(\w+)", entry.group(2))
    assert params == [b"u64"] * len(INPUT_NAMES) + [b"u32"] * len(merge_launch.SCALAR_ARGS) + [b"u64"] * len(OUTPUT_NAMES)
    assert b".reqnctapercluster 8" in ptx
    assert nvrtc.ptx_version(ptx) != "unknown"
