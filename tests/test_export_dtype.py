"""Issue 12, item 4: half-precision exports (`export --dtype fp16|bf16`).

vim_digits (bundled weights, 32x32 images) merged at ratio 0.5 and unmerged. fp16 files run in
onnxruntime's CPU provider against PyTorch in fp16; bf16 files, which onnxruntime's CPU provider
cannot run (no bfloat16 Conv), run in ``onnx.reference`` against PyTorch in bf16. Either must
meet validate's reduced-precision rule (mean cosine, top-1 agreement).
"""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto

from mame_deploy import engine, onnx_export, validate
from mame_deploy import source as sources
from mame_deploy.cli.main import main
from mame_deploy.errors import UserError
from mame_deploy.manifest import INPUT_NAME, OUTPUT_NAME, Source
from mame_deploy.ops.onnx_functions import custom_nodes
from mame_deploy.ops.selective_scan import contract as scan_contract
from mame_deploy.ops.token_merge import contract as merge_contract
from mame_deploy.runners import open_artifact

MODEL = "vim_digits"
HALF = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
KEYS = [("fp16", 0.5), ("fp16", 0.0), ("bf16", 0.5), ("bf16", 0.0)]  # (dtype, ratio): merged and unmerged


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(dtype, ratio) -> the ExportResult of that export."""
    folder = tmp_path_factory.mktemp("dtype")
    out = {}
    for dtype, ratio in KEYS:
        out[dtype, ratio] = onnx_export.export(Source(model=MODEL, ratio=ratio), folder / f"{dtype}_{ratio}.onnx",
                                               dtype=dtype)
    return out


def _types(proto: onnx.ModelProto) -> dict:
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    graph = inferred.graph
    return {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}


@pytest.mark.parametrize("ratio", [0.5, 0.0])
def test_fp16_file_matches_pytorch_fp16_in_onnxruntime(files, ratio):
    report = validate.validate(files["fp16", ratio].onnx_path, samples=16)
    assert report["precision"] == "fp16" and report["runtime"] == "onnxruntime"
    assert report["tolerance"] == validate.REDUCED_PRECISION_TOLERANCE["fp16"]
    assert report["passed"], report
    assert report["decisions_traced"] == bool(ratio)


@pytest.mark.parametrize("ratio", [0.5, 0.0])
def test_bf16_file_matches_pytorch_bf16_in_onnx_reference(files, ratio):
    report = validate.validate(files["bf16", ratio].onnx_path, samples=8)
    assert report["precision"] == "bf16" and report["runtime"] == "onnx.reference"
    assert report["tolerance"] == validate.REDUCED_PRECISION_TOLERANCE["bf16"]
    assert report["decisions_traced"] == bool(ratio)
    assert report["passed"], report


def test_bf16_file_is_refused_by_onnxruntime_cpu_in_one_line(files):
    artifact = open_artifact(files["bf16", 0.5].onnx_path)
    assert artifact.precision == "bf16" and artifact.onnxruntime_lacks_dtype
    with pytest.raises(UserError, match="onnxruntime's CPU provider cannot run"):
        artifact.runner()  # what bench and serve ask for
    assert not open_artifact(files["fp16", 0.5].onnx_path).onnxruntime_lacks_dtype


@pytest.mark.parametrize("key", KEYS)
def test_half_file_keeps_the_contract_types(files, key):
    dtype, ratio = key
    result = files[key]
    proto = onnx.load(result.onnx_path)
    onnx.checker.check_model(proto, full_check=True)
    types = _types(proto)
    half, f32 = HALF[dtype], TensorProto.FLOAT
    assert result.manifest["dtype"] == dtype
    assert result.manifest["opset"] == (22 if dtype == "bf16" else 20)
    # Images in and logits out stay float32; the model casts at both ends.
    assert types[INPUT_NAME] == types[OUTPUT_NAME] == f32
    scans = custom_nodes(proto, scan_contract.ONNX_OP_TYPE)
    assert len(scans) == result.manifest["scan_nodes"]
    for node in scans:
        named = dict(zip(scan_contract.INPUT_NAMES, node.input))
        for name, value in named.items():
            want = f32 if name in scan_contract.FLOAT32_INPUTS else half
            assert types[value] == want, (node.name, name)
        assert types[node.output[0]] == half
    merges = custom_nodes(proto, merge_contract.ONNX_OP_TYPE)
    assert len(merges) == (sum(1 for r in result.manifest["schedule"] if r) if ratio else 0)
    for node in merges:
        named = dict(zip(merge_contract.INPUT_NAMES, node.input))
        assert types[named["hidden"]] == half
        assert types[named["residual"]] == f32  # Vim keeps its residual stream in float32
        for name, want in merge_contract.FIXED_TYPES.items():
            assert TensorProto.DataType.Name(types[named[name]]).lower() == {"float32": "float"}.get(want, want)
    # The scan's A, D and delta_bias weights are float32 initializers with their unrounded values.
    model = sources.build_model(Source(model=MODEL, ratio=ratio), dtype=dtype)
    assert model.layers[0].mixer.A_log.dtype == model.layers[0].mixer.dt_proj.bias.dtype == torch.float32
    assert model.layers[0].mixer.in_proj.weight.dtype == sources.TORCH_DTYPES[dtype]
    fp32 = sources.build_model(Source(model=MODEL, ratio=ratio))
    assert torch.equal(model.layers[0].mixer.A_log, fp32.layers[0].mixer.A_log)


def test_build_plans_a_strongly_typed_half_engine(files):
    plan = engine.plan_build(files["fp16", 0.0].onnx_path)
    assert (plan.precision, plan.strongly_typed) == ("fp16", True)
    assert {node.dtype for node in plan.nodes} == {"float16"}
    with pytest.raises(UserError, match="exported in fp16"):
        engine.plan_build(files["fp16", 0.0].onnx_path, precision="bf16")


def test_fp32_is_the_default_and_untouched():
    model = sources.build_model(Source(model=MODEL))
    assert sources.in_dtype(model, "fp32") is model
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert onnx_export.resolve_opset(None) == onnx_export.resolve_opset(None, "fp16") == onnx_export.DEFAULT_OPSET


def test_bad_dtype_and_bf16_opset_are_one_line_errors(capsys, tmp_path):
    for argv, phrase in ((["--dtype", "fp8"], "--dtype must be one of fp32, fp16, bf16, got 'fp8'"),
                         (["--dtype", "bf16", "--opset", "20"], "--dtype bf16 needs --opset 22")):
        code = main(["export", MODEL, "-o", str(tmp_path / "x.onnx"), "--no-engine", *argv])
        out = capsys.readouterr()
        assert code == 2, (out.out, out.err)
        assert "Traceback" not in out.out + out.err and len(out.err.strip().splitlines()) == 1, out.err
        assert phrase in out.err, out.err
    assert not list(tmp_path.iterdir())
    with pytest.raises(UserError, match="`dtype` must be one of"):
        onnx_export.to_onnx(sources.build_model(Source(model=MODEL)), dtype="half")


def test_manifest_dtype_is_checked(files):
    from mame_deploy import manifest

    record = dict(files["fp16", 0.5].manifest)
    manifest.check_fields(record, "x.json")
    with pytest.raises(UserError, match="field 'dtype' must be one of fp32, fp16, bf16"):
        manifest.check_fields({**record, "dtype": "fp8"}, "x.json")
    record.pop("dtype")  # files from before the field: fp32
    manifest.check_fields(record, "x.json")


def test_bench_baseline_of_a_half_file_is_exported_in_the_same_dtype(files, tmp_path):
    import json

    from mame_deploy.bench import make_unmerged_baseline

    baseline = make_unmerged_baseline(open_artifact(files["fp16", 0.5].onnx_path), tmp_path)
    record = json.loads(baseline.with_suffix(".json").read_text())
    assert (record["dtype"], record["ratio"], record["opset"]) == ("fp16", 0.0, 20)


@pytest.mark.parametrize("flips, cosine, expected", [(0, 0.9999, True), (1, 0.9999, False), (0, 0.998, False)])
def test_traced_half_files_hold_agreeing_samples_to_the_rule_and_flips_to_near_ties(flips, cosine, expected):
    # Over all samples the flips drag cosine and top-1 below the floors; the rule reads the agreeing ones.
    report = {"passed": False, "decisions_traced": True, "unexplained_flips": flips, "mean_cosine": 0.99,
              "top1_agreement": 0.9, "mean_cosine_agreeing": cosine, "top1_agreement_agreeing": 1.0}
    assert validate.passed(report, "fp16") is expected
    assert validate.near_tie_noise("fp16") == validate.NEAR_TIE_ULPS * torch.finfo(torch.float16).eps
    assert validate.near_tie_noise("fp32") == 1e-4
