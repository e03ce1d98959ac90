"""`mame-deploy export / validate / bench`: files, manifest, summary, determinism, and every error
path as one line with exit code 2 (parity failure: exit code 1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mame_deploy.artifacts import file_sha256
from mame_deploy.cli.main import main
from mame_deploy.errors import UserError
from mame_deploy.manifest import REQUIRED_KEYS
from mame_deploy.models import create_model
from mame_deploy.plugins.trt_aot import tensorrt_available

TINY = ["--override", "depth=2"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, out, err, *phrases):
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1, err
    for phrase in phrases:
        assert phrase in err, err


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """vim_t with 2 blocks, batch 2, exported once through the CLI: (folder, code, stdout)."""
    folder = tmp_path_factory.mktemp("export")
    code = main(["export", "vim_t", *TINY, "--batch", "2", "--output", str(folder / "t.onnx")])
    return folder, code


@pytest.fixture
def pair(exported, tmp_path):
    """A private copy of the exported t.onnx + t.json."""
    folder, _ = exported
    for name in ("t.onnx", "t.json"):
        shutil.copy(folder / name, tmp_path / name)
    return tmp_path / "t.onnx", tmp_path / "t.json"


# ---------------------------------------------------------------------------------------------
# export


def test_export_writes_onnx_manifest_and_summary(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = Path("v.onnx")
    code, out, err = run(capsys, "export", "vim_t", *TINY, "--batch", "2", "--output", path)
    assert code == 0, err
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert set(REQUIRED_KEYS) <= set(manifest)
    assert manifest["onnx_sha256"] == file_sha256(path)
    assert manifest["model"] == "vim_t" and manifest["overrides"] == {"depth": 2}
    assert manifest["checkpoint"] is None and manifest["seed"] == 0
    assert manifest["input_shape"] == [2, 3, 224, 224] and manifest["batch"] == 2
    assert manifest["tokens_per_layer"] == [197, 197] and manifest["schedule"] == [0, 0]
    assert manifest["opset"] == 20 and manifest["scan"] == "plugin" and manifest["scan_nodes"] == 4
    assert manifest["versions"]["torch"] == torch.__version__
    for phrase in ("tokens per layer", "197 x2", "GFLOPs", "1.000 of unmerged", "MB", "v.json"):
        assert phrase in out, out
    if not tensorrt_available():
        notes = [line for line in out.splitlines() if "wrote ONNX only" in line]
        assert len(notes) == 1 and "TensorRT is not installed" in notes[0]


def test_same_command_twice_writes_identical_files(capsys, exported):
    folder, code = exported
    assert code == 0
    before = {name: (folder / name).read_bytes() for name in ("t.onnx", "t.json")}
    code, _, err = run(capsys, "export", "vim_t", *TINY, "--batch", "2", "--output", folder / "t.onnx", "--force")
    assert code == 0, err
    assert {name: (folder / name).read_bytes() for name in before} == before


def test_existing_outputs_need_force(capsys, pair):
    onnx_path, json_path = pair
    stamp = (onnx_path.stat().st_mtime_ns, json_path.stat().st_mtime_ns)
    code, out, err = run(capsys, "export", "vim_t", *TINY, "--batch", "2", "--output", onnx_path)
    assert_one_line_error(code, out, err, "already exist", "--force")
    assert (onnx_path.stat().st_mtime_ns, json_path.stat().st_mtime_ns) == stamp


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_engine_without_tensorrt_names_the_extra(capsys, tmp_path):
    code, out, err = run(capsys, "export", "vim_t", *TINY, "--engine", "--output", tmp_path / "e.onnx")
    assert_one_line_error(code, out, err, "TensorRT", "mame-deploy[trt]")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,phrase", [
    (["--batch", "2", "--dynamic-batch"], "exclude each other"),
    (["--batch", "0"], "at least 1"),
    (["--opset", "12"], "--opset 12"),
    (["--scan", "fast"], "--scan must be"),
    (["--ratio", "1.5"], "--ratio"),
    (["--override", "depth"], "KEY=VALUE"),
    (["--override", "wings=3"], "unknown option(s) wings"),
    (["--checkpoint", "missing.pth"], "does not exist"),
    (["--scan", "inline", "--engine"], "--scan plugin"),
])
def test_export_rejects_bad_options(capsys, tmp_path, args, phrase):
    code, out, err = run(capsys, "export", "vim_t", *TINY, *args, "--output", tmp_path / "x.onnx")
    assert_one_line_error(code, out, err, phrase)
    assert not list(tmp_path.iterdir())


def test_export_output_must_be_onnx(capsys, tmp_path):
    code, out, err = run(capsys, "export", "vim_t", *TINY, "--output", tmp_path / "x.json")
    assert_one_line_error(code, out, err, "must end in .onnx")


def test_export_unknown_model(capsys, tmp_path):
    code, out, err = run(capsys, "export", "vim_xl", "--output", tmp_path / "x.onnx")
    assert_one_line_error(code, out, err, "unknown model 'vim_xl'")


def test_checkpoint_is_pinned_and_checked(capsys, tmp_path):
    micro = ["--override", "depth=1", "--override", "img_size=32", "--override", "patch_size=8",
             "--override", "embed_dim=32", "--override", "num_classes=10"]
    weights = tmp_path / "w.pt"
    torch.save({"model": create_model("vim_t", seed=5, depth=1, img_size=32, patch_size=8, embed_dim=32,
                                      num_classes=10).state_dict()}, weights)
    path = tmp_path / "m.onnx"
    code, _, err = run(capsys, "export", "vim_t", *micro, "--checkpoint", weights, "--output", path)
    assert code == 0, err
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["checkpoint"] == str(weights.resolve())
    assert manifest["checkpoint_sha256"] == file_sha256(weights)
    code, out, err = run(capsys, "validate", "--onnx", path, "--samples", "2")
    assert code == 0 and "PASS" in out, out + err
    torch.save({"model": create_model("vim_t", seed=6, depth=1, img_size=32, patch_size=8, embed_dim=32,
                                      num_classes=10).state_dict()}, weights)
    code, out, err = run(capsys, "validate", "--onnx", path)
    assert_one_line_error(code, out, err, "changed since the export")


# ---------------------------------------------------------------------------------------------
# validate


def test_validate_passes_and_writes_json(capsys, pair, tmp_path):
    onnx_path, _ = pair
    report_path = tmp_path / "report.json"
    code, out, err = run(capsys, "validate", "--onnx", onnx_path, "--samples", "3", "--json", report_path)
    assert code == 0, out + err
    report = json.loads(report_path.read_text())
    for key in ("max_abs_err", "max_rel_err", "mean_cosine", "top1_agreement"):
        assert key in report
    assert report["passed"] and report["samples"] == 3 and report["batch"] == 2
    assert report["max_abs_err"] <= 1e-4 * report["max_abs_logit"]
    assert report["top1_agreement"] == 1.0 and report["mean_cosine"] > 0.999999
    assert "PASS" in out
    code, out, err = run(capsys, "validate", "--onnx", onnx_path, "--samples", "1", "--json", report_path)
    assert_one_line_error(code, out, err, "already exist")


def test_validate_reports_failure_with_exit_1(capsys, pair):
    onnx_path, json_path = pair
    manifest = json.loads(json_path.read_text())
    manifest["seed"] = 1  # the rebuilt PyTorch model now has other weights than the file
    json_path.write_text(json.dumps(manifest))
    code, out, err = run(capsys, "validate", "--onnx", onnx_path, "--samples", "2")
    assert code == 1 and "FAIL" in out, out + err


def test_validate_rejects_missing_and_foreign_files(capsys, tmp_path):
    code, out, err = run(capsys, "validate", "--onnx", tmp_path / "none.onnx")
    assert_one_line_error(code, out, err, "does not exist")
    text = tmp_path / "notes.onnx"
    text.write_text("these are not the weights you are looking for\n")
    code, out, err = run(capsys, "validate", "--onnx", text)
    assert_one_line_error(code, out, err, "notes.onnx", "ONNX")
    noise = tmp_path / "noise.onnx"
    noise.write_bytes(bytes(range(256)) * 8)
    code, out, err = run(capsys, "validate", "--onnx", noise)
    assert_one_line_error(code, out, err, "noise.onnx", "ONNX")
    code, out, err = run(capsys, "validate", "--onnx", tmp_path)
    assert_one_line_error(code, out, err, "not a file")


def test_validate_needs_a_matching_manifest(capsys, pair):
    onnx_path, json_path = pair
    original = json_path.read_text()
    json_path.unlink()
    code, out, err = run(capsys, "validate", "--onnx", onnx_path)
    assert_one_line_error(code, out, err, "no manifest", "t.json")
    json_path.write_text("{not json")
    code, out, err = run(capsys, "validate", "--onnx", onnx_path)
    assert_one_line_error(code, out, err, "not a readable manifest")
    manifest = json.loads(original)
    del manifest["schedule"]
    json_path.write_text(json.dumps(manifest))
    code, out, err = run(capsys, "validate", "--onnx", onnx_path)
    assert_one_line_error(code, out, err, "lacks schedule")
    manifest = json.loads(original)
    manifest["onnx_sha256"] = "0" * 64
    json_path.write_text(json.dumps(manifest))
    code, out, err = run(capsys, "validate", "--onnx", onnx_path)
    assert_one_line_error(code, out, err, "does not match")


def test_validate_static_batch_cannot_change(capsys, pair):
    code, out, err = run(capsys, "validate", "--onnx", pair[0], "--batch", "3")
    assert_one_line_error(code, out, err, "exported for batch 2")


# ---------------------------------------------------------------------------------------------
# bench


def test_bench_torch_rows(capsys, tmp_path):
    report_path = tmp_path / "bench.json"
    code, out, err = run(capsys, "bench", "--torch", "vim_t", *TINY, "--batch-sizes", "1,2", "--warmup", "1",
                         "--iters", "3", "--json", report_path)
    assert code == 0, out + err
    report = json.loads(report_path.read_text())
    rows = report["rows"]
    assert [(r["backend"], r["batch"]) for r in rows] == [("torch", 1), ("torch", 2)]
    for row in rows:
        assert row["iters"] == 3 and row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["throughput"] == pytest.approx(row["batch"] / (row["mean_ms"] / 1e3))
        assert row["speedup"] == 1.0  # the unmerged model is its own baseline
    assert report["environment"]["device"] == "cpu"
    assert {r["target"] for r in rows} == {"vim_t (unmerged)"}
    for phrase in ("p50", "p90", "p99", "img/s", "torch vim_t"):
        assert phrase in out


def test_bench_torch_cuda_graph_targets_replay_graphs():
    """`bench --torch M --device cuda --cuda-graph` times CUDA-graph runners, merged and unmerged."""
    from mame_deploy import bench
    from mame_deploy.manifest import Source
    from mame_deploy.runners import TorchGraphRunner

    source = Source(model="vim_t", overrides={"depth": 2}, ratio=0.5)
    targets = bench.torch_targets(source, "cuda", None, cuda_graph=True)
    assert [(t.backend, t.merged) for t in targets] == [("torch-graph", True), ("torch-graph", False)]
    if torch.cuda.is_available():
        assert isinstance(targets[0].make_runner(), TorchGraphRunner)
    else:  # the runner is made when timing starts; without a GPU that is the one-line error
        with pytest.raises(UserError, match="no CUDA device"):
            targets[0].make_runner()
    with pytest.raises(UserError, match="`device` cuda"):
        bench.torch_target(source, "cpu", None, cuda_graph=True)


def test_bench_torch_compile_anchor_in_bf16(capsys, tmp_path, monkeypatch):
    """--compile adds torch.compile rows of both models (mode by device), --dtype runs them in
    that precision, and each speed-up pairs rows of one backend and dtype, beside the ideal."""
    modes = []

    def fake_compile(model, mode=None):  # inductor on a CPU is minutes; the wiring is the point
        modes.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    report_path = tmp_path / "bench.json"
    code, out, err = run(capsys, "bench", "--torch", "vim_t", *TINY, "--ratio", "0.5", "--dtype", "bf16", "--compile",
                         "--batch-sizes", "1", "--warmup", "0", "--iters", "2", "--json", report_path)
    assert code == 0, out + err
    rows = json.loads(report_path.read_text())["rows"]
    assert [(r["backend"], r["merged"]) for r in rows] == [
        ("torch", True), ("torch", False), ("torch-compile", True), ("torch-compile", False)]
    assert modes == ["default", "default"]  # CPU: default mode
    from mame_deploy import bench

    assert bench.compile_mode("cuda") == "reduce-overhead"  # the GPU: its own CUDA graphs
    by_key = {(r["backend"], r["merged"]): r for r in rows}
    for backend in ("torch", "torch-compile"):
        merged, base = by_key[backend, True], by_key[backend, False]
        assert merged["speedup"] == pytest.approx(base["p50_ms"] / merged["p50_ms"], abs=6e-4)  # 3 decimals
        assert merged["ideal_speedup"] == pytest.approx(1 / merged["relative_gflops"], rel=1e-3)
        assert merged["ideal_speedup"] > 1 == base["ideal_speedup"]
    assert {r["dtype"] for r in rows} == {"bf16"} and all(r["target"].endswith(" bf16") for r in rows)
    assert "torch.compile" in out and "ideal" in out


def test_bench_table_keeps_each_label_word_whole_when_latencies_are_wide(capsys, monkeypatch):
    """A busy machine's latencies of many digits narrow the first column: its labels may wrap
    between words but never inside one."""
    from mame_deploy import bench

    timed = bench.bench

    def slow(*args, **kwargs):
        rows = timed(*args, **kwargs)
        for r in rows:
            r.update(p50_ms=123456.78, p90_ms=1234567.89, p99_ms=1234567.89)
        return rows

    monkeypatch.setattr(torch, "compile", lambda model, mode=None: model)
    monkeypatch.setattr(bench, "bench", slow)
    code, out, err = run(capsys, "bench", "--torch", "vim_t", *TINY, "--ratio", "0.5", "--compile",
                         "--batch-sizes", "1", "--warmup", "0", "--iters", "1")
    assert code == 0, out + err
    assert "1234567.89" in out and out.count("torch.compile") == 2


def test_bench_onnx_runs_its_static_batch_beside_torch(capsys, pair, tmp_path):
    report_path = tmp_path / "bench.json"
    code, out, err = run(capsys, "bench", "--onnx", pair[0], "--warmup", "0", "--iters", "2", "--json", report_path)
    assert code == 0, out + err
    rows = json.loads(report_path.read_text())["rows"]
    assert [(r["backend"], r["target"], r["batch"]) for r in rows] == [
        ("onnxruntime", "t.onnx", 2), ("torch", "vim_t (unmerged)", 2)]


@pytest.mark.parametrize("args,phrase", [
    ([], "nothing to time"),
    (["--torch", "vim_t", "--batch-sizes", "1,x"], "--batch-sizes"),
    (["--torch", "vim_t", "--device", "tpu"], "--device"),
    (["--torch", "vim_t", *TINY, "--iters", "0"], "--iters"),
    (["--torch", "vim_t", *TINY, "--cuda-graph"], "--cuda-graph"),  # CPU is the default device
    (["--torch", "vim_t", *TINY, "--dtype", "fp8"], "--dtype must be one of fp32, fp16, bf16"),
    (["--onnx", "missing.onnx", "--compile"], "--compile and --dtype apply to PyTorch models"),
])
def test_bench_rejects_bad_options(capsys, args, phrase):
    code, out, err = run(capsys, "bench", *args)
    assert_one_line_error(code, out, err, phrase)


def test_bench_merged_file_side_by_side_with_unmerged(capsys, tmp_path):
    small = ["--override", "depth=2", "--override", "img_size=64", "--dynamic-batch"]
    merged, plain = tmp_path / "m.onnx", tmp_path / "p.onnx"
    assert main(["export", "vim_t", *small, "--ratio", "0.5", "-o", str(merged)]) == 0
    report_path = tmp_path / "bench.json"
    code, out, err = run(capsys, "bench", "--onnx", merged, "--batch-sizes", "1,2", "--warmup", "0", "--iters", "2",
                         "--json", report_path)
    assert code == 0, out + err
    assert "exporting the unmerged baseline" in out
    rows = json.loads(report_path.read_text())["rows"]
    assert {(r["backend"], r["merged"], r["batch"]) for r in rows} == {
        (backend, merged_, batch) for backend in ("onnxruntime", "torch") for merged_ in (True, False)
        for batch in (1, 2)}
    for row in rows:
        assert row["speedup"] is not None and row["speedup"] > 0
        assert (row["relative_gflops"] < 1) == row["merged"]
    # An unmerged file of the same source given alongside serves as the baseline: no export.
    assert main(["export", "vim_t", *small, "-o", str(plain)]) == 0
    capsys.readouterr()
    code, out, err = run(capsys, "bench", "--onnx", merged, "--onnx", plain, "--batch-sizes", "1", "--warmup", "0",
                         "--iters", "1", "--no-compare-torch", "--json", tmp_path / "b2.json")
    assert code == 0 and "exporting" not in out, out + err
    rows = json.loads((tmp_path / "b2.json").read_text())["rows"]
    assert [(r["target"], r["speedup"] is not None) for r in rows] == [("m.onnx", True), ("p.onnx", True)]


def test_validate_with_a_labelled_image_folder(capsys, tmp_path):
    from PIL import Image

    micro = ["--override", "depth=1", "--override", "img_size=32", "--override", "patch_size=8",
             "--override", "embed_dim=32", "--override", "num_classes=10"]
    path = tmp_path / "m.onnx"
    assert main(["export", "vim_t", *micro, "--batch", "2", "-o", str(path)]) == 0
    rng = np.random.default_rng(0)
    for label in ("3", "7"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{i}.png")
    capsys.readouterr()
    code, out, err = run(capsys, "validate", "--onnx", path, "--data", tmp_path / "data", "--json", tmp_path / "r.json")
    assert code == 0, out + err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples"] == 4 and report["passed"]
    assert 0 <= report["top1_accuracy"] <= 1 and report["top1_accuracy"] == report["top1_accuracy_reference"]
    assert "top-1 accuracy" in out
    code, out, err = run(capsys, "validate", "--onnx", path, "--data", tmp_path / "none")
    assert_one_line_error(code, out, err, "not a directory")


def test_vim_digits_validates_on_its_bundled_test_split(capsys, tmp_path):
    path = tmp_path / "d.onnx"
    assert main(["export", "vim_digits", "--schedule", "2:8,4:8", "--method", "tome", "--batch", "8",
                 "-o", str(path)]) == 0
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["checkpoint"].endswith("vim_digits.pt") and len(manifest["checkpoint_sha256"]) == 64
    assert manifest["schedule_spec"] == "2:8,4:8" and manifest["schedule"][2] == manifest["schedule"][4] == 8
    capsys.readouterr()
    code, out, err = run(capsys, "validate", "--onnx", path, "--samples", "40", "--json", tmp_path / "r.json")
    assert code == 0, out + err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["data"] == "digits/test" and report["samples"] == 40 and report["passed"]
    assert 0 < report["top1_accuracy"] == report["top1_accuracy_reference"] <= 1
    assert "tome, schedule 2:8,4:8" in out
