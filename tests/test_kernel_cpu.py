"""The selective-scan kernel's contract, checked without a GPU: launch geometry (also on
symbolic shapes, as TensorRT passes them), argument order and packing, compile options, the
source as package data, an nvcc / NVRTC compile where those exist, and the op's CPU fallback."""

from __future__ import annotations

import ctypes
import importlib.resources
import re
import shutil
import subprocess
import sys

import pytest
import torch

from mame_deploy.errors import UserError
from mame_deploy.ops.selective_scan import INPUT_NAMES, selective_scan_ref
from mame_deploy.ops.selective_scan.reference import scan_ref_outputs
from mame_deploy.plugins import launch


class Sym:
    """A shape expression that, like TensorRT's SymInt32, supports only +, -, * and // with ints
    (and itself): anything else (comparisons, int(), indexing) raises."""

    def __init__(self, text: str):
        self.text = text

    def _op(self, other, sym: str, swap: bool = False):
        o = other.text if isinstance(other, Sym) else str(other)
        if not isinstance(other, (Sym, int)):
            raise TypeError(f"unsupported operand {other!r}")
        return Sym(f"({o} {sym} {self.text})" if swap else f"({self.text} {sym} {o})")

    def __add__(self, o): return self._op(o, "+")
    def __radd__(self, o): return self._op(o, "+", True)
    def __sub__(self, o): return self._op(o, "-")
    def __rsub__(self, o): return self._op(o, "-", True)
    def __mul__(self, o): return self._op(o, "*")
    def __rmul__(self, o): return self._op(o, "*", True)
    def __floordiv__(self, o): return self._op(o, "//")
    def __rfloordiv__(self, o): return self._op(o, "//", True)

    def __bool__(self):
        raise TypeError("a symbolic shape has no truth value")

    def __index__(self):
        raise TypeError("a symbolic shape is not an int")

    __int__ = __index__

    def __eq__(self, other):
        raise TypeError("symbolic shapes cannot be compared")

    __lt__ = __le__ = __gt__ = __ge__ = __ne__ = __eq__
    __hash__ = None


def evaluate(value, env: dict) -> int:
    return eval(value.text, {}, env) if isinstance(value, Sym) else value  # noqa: S307


@pytest.mark.parametrize("batch,dim,length", [(1, 768, 197), (256, 768, 99), (3, 384, 1), (5, 100, 7)])
def test_launch_params_cover_every_channel(batch, dim, length):
    t = launch.DEFAULT_TUNING
    p = launch.launch_params(batch, dim, length, 16, "float32")
    assert p.grid[0] == batch and p.grid[2] == 1
    # Every channel has a block, and no block is wholly idle.
    assert p.grid[1] * t.channels >= dim > (p.grid[1] - 1) * t.channels
    assert p.block == (t.lanes * t.channels, 1, 1)
    assert p.shared_mem == 0


def test_launch_params_on_symbolic_shapes_match_ints():
    batch, dim, length = Sym("b"), Sym("d"), Sym("l")
    p = launch.launch_params(batch, dim, length, 16, "float16")
    for env in ({"b": 1, "d": 768, "l": 197}, {"b": 64, "d": 1536, "l": 99}, {"b": 7, "d": 33, "l": 2}):
        ints = launch.launch_params(env["b"], env["d"], env["l"], 16, "float16")
        assert tuple(evaluate(v, env) for v in p.grid) == ints.grid
        assert p.block == ints.block and p.shared_mem == ints.shared_mem


def test_kernel_args_follow_tensorrt_aot_order():
    # Input tensors in the ONNX node's order, then int32 scalars, then the outputs.
    args = launch.KERNEL_ARGS
    assert args[: len(INPUT_NAMES)] == INPUT_NAMES
    assert args[-2:] == ("out", "dt_sums")
    assert launch.SCALAR_ARGS == args[len(INPUT_NAMES):-2] == ("batch", "dim", "length")
    assert set(launch.KERNEL_ARG_TYPES) == set(args)
    float_inputs = {n for n in INPUT_NAMES if launch.KERNEL_ARG_TYPES[n] == "const float*"}
    assert float_inputs == {"A", "D", "delta_bias"}
    assert launch.KERNEL_ARG_TYPES["dt_sums"] == "float*"  # float32 whatever the scan's dtype


def test_tunings_keep_each_dt_sums_group_in_one_block():
    # A block holds whole groups of 8 channels, or part of one (then one block computes it).
    for split in ("4x32x32x4", "8x16x32x2", "16x8x32x1", "16x4x32x1", "4x24x32x4", "16x2x32x4x4", "16x1x16x3x16"):
        launch.Tuning.parse(split)
    for split in ("16x6x32x1", "8x12x32x2"):
        with pytest.raises(UserError, match="multiple or a divisor of 8"):
            launch.Tuning.parse(split)


def test_kernel_signature_in_source_matches_kernel_args():
    source = launch.KERNEL_SOURCE.read_text()
    signature = source[source.index("SCAN_KERNEL_NAME(") : source.index("{", source.index("SCAN_KERNEL_NAME("))]
    names = re.findall(r"(\w+)\s*[,)]", re.sub(r"//[^\n]*", "", signature))
    renamed = {"Bmat": "B", "Cmat": "C", "Dskip": "D"}
    assert tuple(renamed.get(n, n) for n in names) == launch.KERNEL_ARGS


def test_pack_args_points_at_each_value_in_order():
    values = {name: 1000 + i for i, name in enumerate(launch.KERNEL_ARGS)}
    values.update(batch=3, dim=768, length=197)
    from mame_deploy.ops.selective_scan.cuda import pack_args

    holders, array = pack_args(values)
    assert len(array) == len(launch.KERNEL_ARGS)
    for i, name in enumerate(launch.KERNEL_ARGS):
        if launch.KERNEL_ARG_TYPES[name] == "int32":
            got = ctypes.cast(array[i], ctypes.POINTER(ctypes.c_int32)).contents.value
        else:
            got = ctypes.cast(array[i], ctypes.POINTER(ctypes.c_void_p)).contents.value
        assert got == values[name], name
    with pytest.raises(ValueError, match="out"):
        pack_args({k: v for k, v in values.items() if k != "out"})


def test_compile_options_select_the_variant():
    opts = launch.compile_options("bfloat16", 8, delta_softplus=False, reverse=True)
    defines = dict(o[2:].split("=", 1) for o in opts)
    assert defines["SCAN_DTYPE"] == "2" and defines["SCAN_DSTATE"] == "8"
    assert defines["SCAN_DELTA_SOFTPLUS"] == "0" and defines["SCAN_REVERSE"] == "1"
    assert defines["SCAN_KERNEL_NAME"] == launch.kernel_name("bfloat16", 8, False, True)
    # Every define the source requires is passed.
    required = set(re.findall(r"!defined\((SCAN_\w+)\)", launch.KERNEL_SOURCE.read_text()))
    assert required == set(defines)


@pytest.mark.parametrize(
    "call",
    [
        lambda: launch.compile_options("float64", 16, True, False),
        lambda: launch.compile_options("float32", 64, True, False),
        lambda: launch.launch_params(1, 768, 197, 12, "float32"),
        lambda: launch.Tuning(lanes=3),
        lambda: launch.Tuning(lanes=4, channels=32, chunk=24),
        lambda: launch.Tuning.parse("4x32"),
        lambda: launch.Tuning(lanes=16, channels=1, chunk=16, segments=3),  # 48 threads: not whole warps
        lambda: launch.Tuning(lanes=16, channels=8, chunk=32, segments=16),  # 2048 threads
        lambda: launch.Tuning(lanes=16, channels=2, chunk=32, segments=0),
        lambda: launch.compile_ptx("float32", 16, True, False, arch="volta"),
    ],
)
def test_bad_variants_fail_with_one_line(call):
    with pytest.raises(UserError) as info:
        call()
    assert "\n" not in str(info.value)


def test_tuning_for_picks_the_split_by_channel_count():
    # Fewest channels with a known length: the first segmented split whose segments hold it.
    for length in (1, 99, 128, 197, 224):
        tuning = launch.tuning_for(1, 768, length)
        assert tuning.segments > 1 and length <= tuning.covered_length
        assert tuning == next(t for t in launch.SEGMENTED_TUNINGS if length <= t.covered_length)
    assert launch.tuning_for(1, 768, 10_000) == launch.SMALL_BATCH_TUNING  # longer than any covers
    assert launch.tuning_for(1, 768) == launch.SMALL_BATCH_TUNING  # length unknown
    assert launch.tuning_for(4, 768, 197) == launch.SMALL_BATCH_TUNING
    assert launch.tuning_for(8, 768) == launch.MEDIUM_BATCH_TUNING
    assert launch.tuning_for(16, 768) == launch.DEFAULT_TUNING
    assert launch.tuning_for(256, 768) == launch.DEFAULT_TUNING
    assert launch.tuning_for(Sym("b"), 768) == launch.DEFAULT_TUNING  # TensorRT's symbolic batch
    # One state per lane at most: d_state 8 narrows the small-batch split, still valid.
    assert launch.SMALL_BATCH_TUNING.for_dstate(8).lanes == 8


def test_tuning_parse_round_trips():
    t = launch.Tuning.parse("8x16x32x2")
    assert (t.lanes, t.channels, t.chunk, t.min_blocks) == (8, 16, 32, 2)
    assert launch.Tuning.parse(str(t)) == t
    assert launch.Tuning.parse("4x32x32").min_blocks == launch.DEFAULT_TUNING.min_blocks
    segmented = launch.Tuning.parse("16x4x16x2x4")
    assert segmented.segments == 4 and segmented.threads == 256
    assert launch.Tuning.parse(str(segmented)) == segmented


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("tuning", ["4x32x32x4", "16x8x32x1", "16x2x32x3x8", "16x1x16x3x16", "4x8x16x2x4"])
@pytest.mark.parametrize("dstate", [8, 16, 32])
def test_shared_memory_formula_matches_the_compiler(tmp_path, tuning, dstate):
    """launch.Tuning.shared_bytes decides which splits fit; it must agree with ptxas (which drops
    the one-row array a variant leaves unused)."""
    t = launch.Tuning.parse(tuning)
    opts = launch.compile_options("float32", dstate, True, False, t)
    cmd = ["nvcc", "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), *opts, str(launch.KERNEL_SOURCE)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    compiled = int(re.search(r"(\d+) bytes smem", result.stderr).group(1))
    fitted = t.for_dstate(dstate)
    row_bytes = 4 * (fitted.chunk + 4) + 4 * (dstate // fitted.lanes + 1)
    assert compiled <= fitted.shared_bytes(dstate) <= compiled + row_bytes <= launch.MAX_SHARED_BYTES + row_bytes


def test_launch_params_size_the_block_for_every_segment():
    tuning = launch.Tuning(lanes=16, channels=4, chunk=16, min_blocks=2, segments=4)
    params = launch.launch_params(1, 768, 197, 16, "float32", tuning)
    assert params.grid == (1, 192, 1) and params.block == (256, 1, 1)
    # d_state 8: half the lanes, twice the channels per block, same block size.
    narrowed = tuning.for_dstate(8)
    assert (narrowed.lanes, narrowed.channels, narrowed.threads) == (8, 8, 256)
    assert launch.launch_params(1, 768, 197, 8, "float32", tuning).grid == (1, 96, 1)
    # d_state 32: two states per lane; a split whose tiles would not fit keeps fewer segments.
    big = launch.Tuning(lanes=16, channels=2, chunk=32, min_blocks=3, segments=8)
    assert big.shared_bytes(32) > launch.MAX_SHARED_BYTES
    assert big.for_dstate(32).segments == 4 and big.for_dstate(32).shared_bytes(32) <= launch.MAX_SHARED_BYTES


def test_kernel_source_is_package_data():
    files = importlib.resources.files("mame_deploy.plugins")
    assert (files / "selective_scan.cu").is_file()
    assert launch.KERNEL_SOURCE.is_file()
    text = launch.KERNEL_SOURCE.read_text()
    assert "#include" not in text  # NVRTC compiles it with no include path


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize(
    "tuning",
    [launch.DEFAULT_TUNING, launch.MEDIUM_BATCH_TUNING, launch.SMALL_BATCH_TUNING, *launch.SEGMENTED_TUNINGS],
    ids=str,
)
@pytest.mark.parametrize(
    "dtype,dstate,softplus,reverse",
    [("float32", 16, True, False), ("float16", 16, True, True), ("bfloat16", 8, False, False), ("float32", 32, True, True)],
)
def test_nvcc_compiles_the_kernel_for_sm90(tmp_path, dtype, dstate, softplus, reverse, tuning):
    opts = launch.compile_options(dtype, dstate, softplus, reverse, tuning)
    cmd = ["nvcc", "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), *opts, str(launch.KERNEL_SOURCE)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    if dstate == 16:  # Vim's size: the hot loop must stay in registers
        assert "0 bytes spill stores" in result.stderr, result.stderr


def _has_nvrtc() -> bool:
    try:
        from cuda.bindings import nvrtc

        return nvrtc.nvrtcVersion()[0] == nvrtc.nvrtcResult.NVRTC_SUCCESS
    except Exception:
        return False


@pytest.mark.skipif(not _has_nvrtc(), reason="cuda-python with NVRTC is not installed")
@pytest.mark.parametrize("dtype", list(launch.DTYPES))
def test_nvrtc_ptx_has_the_named_kernel(dtype):
    ptx, name = launch.compile_ptx(dtype, 16, True, True, arch="sm_90")
    assert name == launch.kernel_name(dtype, 16, True, True)
    assert f".entry {name}(".encode() in ptx
    assert b".target sm_90" in ptx
    # Twelve parameters, as KERNEL_ARGS says.
    entry = ptx[ptx.index(f".entry {name}(".encode()):]
    assert entry[: entry.index(b")")].count(b".param") == len(launch.KERNEL_ARGS)
    assert launch.compile_ptx(dtype, 16, True, True, arch="sm_90")[0] is ptx  # cached


def _inputs(batch=2, dim=6, length=5, dstate=16):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, dim, length, generator=g), torch.randn(batch, dim, length, generator=g),
        -torch.rand(dim, dstate, generator=g) * 4, torch.randn(batch, dstate, length, generator=g),
        torch.randn(batch, dstate, length, generator=g), torch.randn(dim, generator=g),
        torch.randn(batch, dim, length, generator=g), torch.randn(dim, generator=g),
    )


def test_op_runs_the_reference_on_cpu():
    import mame_deploy.ops.selective_scan  # noqa: F401  (registers the CUDA kernel; must not affect the CPU)

    args = _inputs()
    for reverse in (False, True):
        got = torch.ops.mame.selective_scan(*args, True, reverse)
        torch.testing.assert_close(got, scan_ref_outputs(*args, True, reverse), rtol=0, atol=0)


def test_cuda_kernel_is_registered_for_the_op():
    import mame_deploy.ops.selective_scan  # noqa: F401

    assert torch._C._dispatch_has_kernel_for_dispatch_key("mame::selective_scan", "CUDA")


def test_kernel_entry_points_fail_clearly_without_gpu_or_cuda_python(monkeypatch):
    from mame_deploy.ops import cuda_driver
    from mame_deploy.ops.selective_scan.cuda import selective_scan_cuda

    with pytest.raises(UserError, match="CUDA tensors"):
        selective_scan_cuda(*_inputs())
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(UserError, match="cuda-python"):
        cuda_driver.driver()
    with pytest.raises(UserError, match="cuda-python"):
        launch._nvrtc()


def test_mamba_ssm_backend_needs_mamba_ssm(monkeypatch):
    from mame_deploy.ops import mamba_ssm_backend

    mamba_ssm_backend.selective_scan_fn.cache_clear()
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)
    with pytest.raises(UserError, match="mamba-ssm"):
        mamba_ssm_backend.mamba_ssm_scan(*_inputs()[:8], reverse=False)
    mamba_ssm_backend.selective_scan_fn.cache_clear()


def test_scan_inputs_are_vim_like_and_the_error_metric_is_normwise():
    from mame_deploy.ops.fixtures import relative_error, scan_inputs

    args = scan_inputs(3, 12, 7, dstate=8, dtype=torch.bfloat16, seed=5, device="cpu")
    assert args["u"].shape == args["delta"].shape == args["z"].shape == (3, 12, 7)
    assert args["B"].shape == args["C"].shape == (3, 8, 7) and args["A"].shape == (12, 8)
    assert {args[k].dtype for k in ("u", "delta", "B", "C", "z")} == {torch.bfloat16}
    assert {args[k].dtype for k in ("A", "D", "delta_bias")} == {torch.float32}
    assert ((-16.0 <= args["A"]) & (args["A"] <= -1.0)).all()
    dt = torch.nn.functional.softplus(args["delta_bias"])
    assert ((0.99e-3 <= dt) & (dt <= 0.101)).all()
    again = scan_inputs(3, 12, 7, dstate=8, dtype=torch.bfloat16, seed=5, device="cpu")
    assert all(torch.equal(args[k], again[k]) for k in args)  # seeded
    linear = scan_inputs(2, 4, 3, softplus=False, device="cpu")
    assert (linear["delta"] + linear["delta_bias"][None, :, None] > 0).all()
    ref = torch.tensor([3.0, 4.0])
    assert relative_error(ref, ref) == 0.0
    assert relative_error(torch.tensor([3.0, 4.0 + 0.5]), ref) == pytest.approx(0.1)
