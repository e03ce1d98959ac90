"""TensorRT: engines built from exported models, and the behaviour where TensorRT is missing.

The first group runs everywhere: it hides TensorRT (if installed) and checks that every entry
point says in one line how to install it. The second group needs TensorRT and a GPU and skips
with the reason elsewhere (every development machine of this project: see docs/tensorrt.md).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from dataclasses import replace

import numpy as np
import onnx
import pytest
from shape_expr import Sym, evaluate

from mame_deploy import engine
from mame_deploy.errors import UserError

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None

needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (pip install 'mame-deploy[trt]')")


@pytest.fixture()
def no_tensorrt(monkeypatch):
    """Make ``import tensorrt`` fail as on a machine without it, wherever the test runs."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture()
def exported_stub(tmp_path):
    """A valid one-scan model with its manifest (what `export` leaves), no TensorRT needed."""
    from test_engine_prep import write_export

    return write_export(tmp_path / "net.onnx")


# ---------------------------------------------------------------------------------------------
# Without TensorRT


def test_require_tensorrt_names_the_extra(no_tensorrt):
    with pytest.raises(UserError) as err:
        engine.require_tensorrt("building an engine")
    assert str(err.value) == (
        "TensorRT is needed for building an engine; install it with pip install 'mame-deploy[trt]' "
        "on a machine with an NVIDIA GPU"
    )


def test_plugin_registration_needs_tensorrt(no_tensorrt):
    from mame_deploy import plugins

    with pytest.raises(UserError, match=r"TensorRT is needed for the mame::SelectiveScan plugin"):
        plugins.register()


def test_build_engine_needs_tensorrt_and_writes_nothing(no_tensorrt, exported_stub):
    with pytest.raises(UserError, match="TensorRT is needed for building an engine"):
        engine.build_engine(exported_stub)
    assert sorted(p.name for p in exported_stub.parent.iterdir()) == ["net.json", "net.onnx"]


def test_build_cli_without_tensorrt_is_one_line_and_exit_2(no_tensorrt, exported_stub, capsys):
    from mame_deploy.cli.main import main

    code = main(["build", str(exported_stub), "--precision", "fp16"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0, err
    assert "TensorRT is needed for building an engine" in err and "pip install 'mame-deploy[trt]'" in err


def test_build_cli_usage_errors_exit_2(exported_stub, capsys):
    from mame_deploy.cli.main import main

    assert main(["build"]) == 2
    assert main(["build", str(exported_stub), "--max-batch", "many"]) == 2


# ---------------------------------------------------------------------------------------------
# With TensorRT (and a GPU)


@pytest.fixture(scope="module")
def trt():
    if not HAVE_TRT:
        pytest.skip("TensorRT is not installed (pip install 'mame-deploy[trt]')")
    import tensorrt

    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    return tensorrt


def skip_without_weak_typing(trt, precision):
    """An fp32 file builds fp16/bf16 only through the builder's precision flags (weak typing),
    deprecated since TensorRT 10.12 and removed in 11: skip there instead of failing."""
    if precision != "fp32" and not hasattr(trt.BuilderFlag, precision.upper()):
        pytest.skip(f"TensorRT {trt.__version__} has no weak typing (removed in 11); {precision} needs a {precision} export")


@needs_trt
def test_plugin_is_registered_under_the_onnx_domain(trt):
    from mame_deploy import plugins

    plugins.register()
    plugins.register()  # idempotent
    creator = trt.get_plugin_registry().get_creator("SelectiveScan", "1", "mame")
    assert creator is not None
    assert [f.name for f in creator.field_names] == ["delta_softplus", "reverse"]


@needs_trt
def test_parser_binds_every_scan_node_to_the_plugin(trt, exported_stub):
    from polygraphy.backend.trt import NetworkFromOnnxBytes

    from mame_deploy import plugins

    plugins.register()
    model = onnx.load(exported_stub)
    prepared = engine.prepare_onnx(model)
    builder, network, parser = NetworkFromOnnxBytes(prepared.SerializeToString(), strongly_typed=True)()
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    plugin_layers = [layer for layer in layers if layer.type == trt.LayerType.PLUGIN_V3]
    assert len(plugin_layers) == len(engine.scan_nodes(model)) == 1
    assert network.get_output(0).dtype == trt.float32


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_of_a_stub_model_matches_the_reference(trt, exported_stub, precision):
    import torch

    from mame_deploy.ops.selective_scan.reference import scan_ref_outputs
    from mame_deploy.trt_runner import TrtRunner

    skip_without_weak_typing(trt, precision)
    plan = engine.build_engine(exported_stub, precision=precision, force=True)
    record = json.loads(plan.with_suffix(".json").read_text())["engine"]
    assert record["precision"] == precision and record["tensorrt"] == trt.__version__
    assert record["plugin"]["implementation"] == "aot"

    model = onnx.load(exported_stub)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}
    with TrtRunner(plan) as runner:
        outputs = runner.infer(feeds)
    args = {**feeds, **weights}
    wants = scan_ref_outputs(*(torch.from_numpy(args[n]) for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
                             delta_softplus=True, reverse=False)
    tol = 1e-5 if precision == "fp32" else 5e-3
    for got, want in zip(outputs.values(), wants, strict=True):  # out, then dt_sums
        want = want.numpy()
        assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want)


def test_trt_runner_needs_tensorrt(no_tensorrt, tmp_path):
    from mame_deploy.trt_runner import TrtRunner

    with pytest.raises(UserError, match="TensorRT is needed for running an engine"):
        TrtRunner(tmp_path / "missing.plan")


def test_plugin_implementation_is_read_from_the_plans_manifest(tmp_path):
    from mame_deploy.trt_runner import plugin_implementation

    plan = tmp_path / "net.plan"
    assert plugin_implementation(plan) == "aot"  # no manifest: engines are AOT unless recorded
    plan.with_suffix(".json").write_text(json.dumps({"engine": {"plugin": {"implementation": "jit"}}}))
    assert plugin_implementation(plan) == "jit"


# ---------------------------------------------------------------------------------------------
# The plugin's AOT computation (no TensorRT): what aot_impl hands TensorRT


@pytest.fixture()
def no_compile(monkeypatch):
    """The launch geometry alone: skip NVRTC (which the GPU test and the PTX test cover)."""
    from mame_deploy.plugins import launch

    monkeypatch.setattr(launch, "compile_ptx", lambda *args, **kw: (b"ptx", "kernel"))


@pytest.mark.parametrize("dims", [(1, 768, 197), (64, 768, 99), (3, 384, 1), (256, 1536, 400), (5, 100, 13)])
def test_aot_kernel_is_the_same_for_ints_and_shape_expressions(no_compile, dims):
    """A dynamic-batch engine gets TensorRT expressions; they must give the launch that the
    same split gives for ints. PTX and launch always use one split."""
    from mame_deploy.plugins import launch
    from mame_deploy.plugins.trt_plugin import aot_kernel

    env = dict(zip(("batch", "dim", "length"), dims))
    symbolic = aot_kernel("float16", *(Sym.var(k) for k in env), 16, True, False)
    expected = launch.launch_params(*dims, 16, "float16", launch.DEFAULT_TUNING)  # unknown batch: default split
    assert tuple(evaluate(x, env) for x in symbolic.grid) == tuple(expected.grid)
    assert tuple(evaluate(x, env) for x in symbolic.block) == tuple(expected.block)
    assert evaluate(symbolic.shared_mem, env) == expected.shared_mem
    assert tuple(evaluate(x, env) for x in symbolic.scalars) == dims  # int32 args: batch, dim, length

    static = aot_kernel("float16", *dims, 16, True, False)
    tuning = launch.tuning_for(*dims)
    assert static == replace(static, **vars(launch.launch_params(*dims, 16, "float16", tuning)))
    assert static.scalars == dims


def test_ptx_and_launch_come_from_the_same_work_split(monkeypatch):
    from mame_deploy.plugins import launch
    from mame_deploy.plugins.trt_plugin import aot_kernel

    seen = []
    monkeypatch.setattr(launch, "compile_ptx", lambda *args: seen.append(args[-1]) or (b"ptx", "kernel"))
    real = launch.launch_params
    monkeypatch.setattr(launch, "launch_params", lambda *args: seen.append(args[-1]) or real(*args))
    aot_kernel("float32", 1, 768, 197, 16, True, False)  # few channels, static: a segmented split
    aot_kernel("float32", 64, 768, 197, 16, True, False)
    aot_kernel("float32", Sym.var("batch"), 768, 197, 16, True, False)
    batch_one = launch.tuning_for(1, 768, 197)
    assert batch_one.segments > 1
    assert seen == [batch_one] * 2 + [launch.DEFAULT_TUNING] * 4


def test_kernel_arguments_follow_tensorrts_aot_order():
    from mame_deploy.ops.selective_scan.contract import INPUT_NAMES
    from mame_deploy.plugins import launch

    # TensorRT passes the plugin's inputs, then the extra int32 arguments, then the outputs.
    assert launch.KERNEL_ARGS[: len(INPUT_NAMES)] == INPUT_NAMES
    assert launch.KERNEL_ARGS[-2:] == ("out", "dt_sums")
    assert all(launch.KERNEL_ARG_TYPES[n] == "int32" for n in launch.KERNEL_ARGS[len(INPUT_NAMES):-2])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("reverse", [False, True])
def test_plugin_ptx_entry_takes_pointers_then_int32s_then_the_outputs(dtype, reverse):
    pytest.importorskip("cuda.bindings.nvrtc", reason="NVRTC (cuda-python) is not installed")
    import re

    from mame_deploy.plugins.trt_plugin import aot_kernel

    kernel = aot_kernel(dtype, 2, 768, 99, 16, True, reverse, arch="sm_90")
    entry = re.search(rb"\.entry\s+(\w+)\s*\((.*?)\)", kernel.ptx, re.S)
    assert entry is not None and entry.group(1).decode() == kernel.name
    params = re.findall(rb"\.param\s+\.(\w+)", entry.group(2))
    expected = [b"u64"] * 8 + [b"u32"] * len(kernel.scalars) + [b"u64"] * 2  # PTX spells int32 as .u32
    assert params == expected


# ---------------------------------------------------------------------------------------------
# validate/bench on engines: the rules that need no GPU, and the CLI without TensorRT


def test_engine_batch_static_and_profile():
    from mame_deploy.runners import Artifact

    def engine_batch(engine, requested, samples):
        artifact = Artifact(Path("x.plan"), "tensorrt", {"batch": None, "engine": engine}, "cuda")
        return artifact.batch_for(requested, samples)

    assert engine_batch({"batch": 8}, None, 3) == 8
    assert engine_batch({"batch": 8}, 8, 3) == 8
    with pytest.raises(UserError, match="built for batch 8, not 4"):
        engine_batch({"batch": 8}, 4, 3)
    profile = {"batch": {"min": 1, "opt": 16, "max": 64}}
    assert engine_batch(profile, None, 3) == 3
    assert engine_batch(profile, None, 100) == 16
    assert engine_batch(profile, 64, 100) == 64
    with pytest.raises(UserError, match=r"outside the engine's profile \(1..64\)"):
        engine_batch(profile, 65, 100)


@pytest.mark.parametrize(
    "report, precision, expected",
    [
        ({"passed": True, "mean_cosine": 0.5, "top1_agreement": 0.0}, "fp32", True),
        ({"passed": False, "mean_cosine": 1.0, "top1_agreement": 1.0}, "fp32", False),
        ({"passed": False, "mean_cosine": 0.9995, "top1_agreement": 1.0}, "fp16", True),
        ({"passed": False, "mean_cosine": 0.998, "top1_agreement": 1.0}, "fp16", False),
        ({"passed": False, "mean_cosine": 0.9999, "top1_agreement": 0.95}, "fp16", False),
        ({"passed": False, "mean_cosine": 0.996, "top1_agreement": 0.98}, "bf16", True),
    ],
)
def test_reduced_precision_engines_pass_on_cosine_and_top1(report, precision, expected):
    from mame_deploy.validate import passed

    assert passed(report, precision) is expected


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", "--engine", "net.plan"],
        ["bench", "--engine", "net.plan", "--iters", "5"],
        ["export", "vim_t", "--engine", "--output", "x.onnx"],
    ],
)
def test_engine_commands_without_tensorrt_are_one_line_and_exit_2(no_tensorrt, tmp_path, monkeypatch, capsys, argv):
    from mame_deploy.cli.main import main

    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "TensorRT is needed" in err and "pip install 'mame-deploy[trt]'" in err
    assert list(tmp_path.iterdir()) == []


def test_validate_needs_exactly_one_of_onnx_and_engine(capsys):
    from mame_deploy.cli.main import main

    assert main(["validate"]) == 2
    assert main(["validate", "--onnx", "a.onnx", "--engine", "a.plan"]) == 2
    assert "pass one of --onnx PATH.onnx or --engine PATH.plan" in capsys.readouterr().err


@pytest.fixture(scope="module")
def vim_export(trt, tmp_path_factory):
    """A small merged Vision Mamba export with a dynamic batch (one per module: exports are slow)."""
    from mame_deploy.manifest import Source
    from mame_deploy.onnx_export import export

    folder = tmp_path_factory.mktemp("vim")
    source = Source(model="vim_t", overrides={"depth": 4}, ratio=0.5)
    return export(source, folder / "vim.onnx", batch=None).onnx_path


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_vim_engine_validates_against_pytorch(trt, vim_export, precision):
    from mame_deploy.validate import validate

    skip_without_weak_typing(trt, precision)
    plan = engine.build_engine(vim_export, output=vim_export.with_name(f"vim_{precision}.plan"),
                               precision=precision, max_batch=4, opt_batch=2, force=True)
    record = engine.read_engine_manifest(plan)["engine"]
    assert record["batch"] == {"min": 1, "opt": 2, "max": 4}
    assert record["plugin"]["nodes"] == 8
    report = validate(plan, samples=6, batch=3)
    assert report["batch"] == 3 and report["samples"] == 6
    assert report["passed"], report


@needs_trt
def test_vim_engine_bench_rows(trt, vim_export, tmp_path):
    from mame_deploy import bench

    plan = engine.build_engine(vim_export, output=tmp_path / "vim.plan", max_batch=2, force=True)
    targets = bench.artifact_targets([plan], "cuda", None, tmp_path, baseline=True, compare_torch=True)
    assert [t.backend for t in targets] == ["tensorrt", "tensorrt", "torch", "torch-graph", "torch", "torch-graph"]
    rows = bench.bench(targets, [1, 2], warmup=1, iters=3)
    assert len(rows) == 12 and all(r["p50_ms"] > 0 for r in rows)
    assert all(r["speedup"] for r in rows if r["merged"])


def test_cuda_graph_runner_replays_the_eager_model():
    """The PyTorch CUDA-graph side of `bench --engine` (needs a GPU, not TensorRT)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from mame_deploy import manifest, source
    from mame_deploy.runners import TorchGraphRunner, TorchRunner

    model = source.build_model(manifest.Source(model="vim_t", overrides={"depth": 2}, ratio=0.5))
    rng = np.random.default_rng(0)
    first, second = (rng.standard_normal((2, 3, 224, 224), dtype=np.float32) for _ in range(2))
    with TorchRunner(model, "cuda") as eager:
        want = [eager.infer({"images": x})["logits"] for x in (first, second)]
    with TorchGraphRunner(model) as graph:
        got = [graph.infer({"images": x})["logits"] for x in (first, second)]
        assert graph.last_inference_time() > 0
        assert len(graph.graphs) == 1  # one capture per shape, replayed for new inputs
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= 1e-4 * np.abs(w).max()
    assert not np.allclose(got[0], got[1])


def test_engine_bench_targets_pair_the_engine_with_its_pytorch_source(tmp_path):
    """What `bench --engine` times, composed from the plan's manifest (no TensorRT needed to
    compose; the unmerged engine, which needs a build, is left out here)."""
    from mame_deploy import artifacts, bench, manifest
    from mame_deploy.onnx_export import export

    result = export(manifest.Source(model="vim_t", overrides={"depth": 2}, ratio=0.5), tmp_path / "net.onnx")
    plan = tmp_path / "net.plan"
    plan.write_bytes(b"engine")
    record = dict(result.manifest)
    record["engine"] = engine.engine_record(engine.plan_build(result.onnx_path, force=True), b"engine", "10.13.0", {})
    artifacts.write_json(result.manifest_path, record)

    targets = bench.artifact_targets([plan], "cpu", None, tmp_path, baseline=False, compare_torch=True)
    assert [(t.backend, t.merged, t.fixed_batch) for t in targets] == [
        ("tensorrt", True, 1), ("torch", True, 1), ("torch-graph", True, 1)
    ]
    assert targets[0].label == "net.plan (fp32)"
    assert targets[0].tokens_per_layer == targets[1].tokens_per_layer == record["tokens_per_layer"]
    assert targets[1].label == targets[2].label
