"""Issue 10, section 2 and 3: every bad input is one line on stderr and exit code 2, and no
command leaves a file behind, half a pair, or a replaced file it was not allowed to replace.

Models are tiny (vim_t with one block on 32x32 images) so each case runs in seconds; the cases
that need real processes (two concurrent exports, a read-only folder, a real write error) spawn
the CLI as a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mame_deploy import artifacts, bench, memory
from mame_deploy.artifacts import file_sha256
from mame_deploy.cli.main import main
from mame_deploy.errors import UserError
from mame_deploy.models import create_model
from mame_deploy.schedule import MAX_RATIO

MICRO = ["--override", "depth=1", "--override", "img_size=32", "--override", "patch_size=8",
         "--override", "embed_dim=32", "--override", "num_classes=10"]
MICRO_CONFIG = dict(depth=1, img_size=32, patch_size=8, embed_dim=32, num_classes=10)
REPO = Path(__file__).resolve().parent.parent
CLI = ["-c", "import sys; from mame_deploy.cli.main import main; sys.exit(main(sys.argv[1:]))"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, out, err, *phrases):
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1, err
    for phrase in phrases:
        assert phrase in err, err


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (hidden temporaries included) with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_process(*argv, **kwargs):
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, *CLI, *map(str, argv)], capture_output=True, text=True, env=env,
                          timeout=300, **kwargs)


@pytest.fixture(scope="module")
def micro_pair(tmp_path_factory):
    """A micro vim_t exported once, static batch 2: (folder, onnx path)."""
    folder = tmp_path_factory.mktemp("micro")
    assert main(["export", "vim_t", *MICRO, "--batch", "2", "-o", str(folder / "m.onnx")]) == 0
    return folder / "m.onnx"


@pytest.fixture
def pair(micro_pair, tmp_path):
    """A private copy of the micro pair."""
    for suffix in (".onnx", ".json"):
        shutil.copy(micro_pair.with_suffix(suffix), tmp_path / f"m{suffix}")
    return tmp_path / "m.onnx"


@pytest.fixture(scope="module")
def dynamic_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dynamic")
    assert main(["export", "vim_t", *MICRO, "--dynamic-batch", "-o", str(folder / "d.onnx")]) == 0
    return folder / "d.onnx"


@pytest.fixture
def little_memory(monkeypatch):
    """A machine with 16 GB free, whatever this one has: the memory tests then read the same."""
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 16 * 10 ** 9)


# ---------------------------------------------------------------------------------------------
# Config overrides, counts and threads


@pytest.mark.parametrize("override,phrase", [
    ("embed_dim=abc", "embed_dim must be a whole number greater than 0, got 'abc'"),
    ("depth=0", "depth must be a whole number greater than 0, got 0"),
    ("img_size=0", "img_size must be a whole number greater than 0, got 0"),
    ("depth=2.5", "depth must be a whole number"),
    ("norm_eps=-1", "norm_eps must be a number greater than 0"),
    ("patch_size=64", "patch_size 64 is larger than img_size 32"),
])
def test_bad_overrides_are_one_line(capsys, tmp_path, override, phrase):
    code, out, err = run(capsys, "export", "vim_t", *MICRO, "--override", override, "-o", tmp_path / "x.onnx")
    assert_one_line_error(code, out, err, phrase)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_eval_limit_must_be_positive(capsys, limit):
    code, out, err = run(capsys, "eval", "vim_digits", "--limit", limit)
    assert_one_line_error(code, out, err, f"--limit must be at least 1", f"got {limit}")


def test_validate_threads_must_be_positive(capsys, pair):
    before = snapshot(pair.parent)
    code, out, err = run(capsys, "validate", "--onnx", pair, "--threads", "-2")
    assert_one_line_error(code, out, err, "--threads must be at least 1", "got -2")
    assert snapshot(pair.parent) == before


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_bench_threads_must_be_positive(capsys, threads):
    code, out, err = run(capsys, "bench", "--torch", "vim_t", *MICRO, "--threads", threads, "--iters", "1")
    assert_one_line_error(code, out, err, "--threads must be at least 1", f"got {threads}")
    assert "latency" not in out  # refused before anything was timed


# ---------------------------------------------------------------------------------------------
# Memory


def test_export_refuses_a_batch_that_cannot_fit(capsys, tmp_path, little_memory):
    code, out, err = run(capsys, "export", "vim_t", "--batch", "100000", "-o", tmp_path / "big.onnx")
    assert_one_line_error(code, out, err, "--batch 100000", "needs about 60.3 GB of memory",
                          "16.0 GB available", "--dynamic-batch")
    assert not list(tmp_path.iterdir())


def test_bench_refuses_batch_sizes_that_cannot_fit(capsys, little_memory):
    code, out, err = run(capsys, "bench", "--torch", "vim_t", "--batch-sizes", "1,100000", "--iters", "1")
    assert_one_line_error(code, out, err, "--batch-sizes 100000", "(100000, 197, 384, 16) float32",
                          "TB of memory", "use a smaller --batch-sizes")
    assert "latency" not in out


def test_bench_checks_memory_before_exporting_a_baseline(capsys, little_memory, tmp_path):
    merged = tmp_path / "r.onnx"
    two_blocks = [a if a != "depth=1" else "depth=2" for a in MICRO]  # a merge needs a block after it
    assert main(["export", "vim_t", *two_blocks, "--ratio", "0.5", "--dynamic-batch", "-o", str(merged)]) == 0
    capsys.readouterr()
    code, out, err = run(capsys, "bench", "--onnx", merged, "--batch-sizes", "10000000", "--iters", "1")
    assert_one_line_error(code, out, err, "--batch-sizes 10000000", "of memory")
    assert "exporting the unmerged baseline" not in out


def test_validate_refuses_a_batch_that_cannot_fit(capsys, dynamic_pair, little_memory):
    code, out, err = run(capsys, "validate", "--onnx", dynamic_pair, "--batch", "100000", "--samples", "2")
    assert_one_line_error(code, out, err, "--batch 100000", "needs about", "16.0 GB available")


def test_memory_estimates_and_the_machine_reading():
    from mame_deploy.models import model_config

    vim_t = model_config("vim_t")
    assert memory.parameter_bytes(vim_t) == 4 * sum(p.numel() for p in create_model("vim_t", depth=24).parameters())
    # the scan term dominates: 5 (B, L, d_inner, d_state) float32 tensors per image
    per_image = memory.forward_bytes(vim_t, 2) - memory.forward_bytes(vim_t, 1)
    assert per_image > memory.SCAN_COPIES * 197 * 384 * 16 * 4
    assert memory.forward_bytes(vim_t, 1000) > 1000 * per_image * 0.99
    free = memory.available_bytes("cpu")
    assert free is None or 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert artifacts.format_bytes(60_211_200_000) == "60.2 GB"


# ---------------------------------------------------------------------------------------------
# Manifest fields and the ONNX file's input


@pytest.mark.parametrize("field,value,phrase", [
    ("seed", "abc", "field 'seed' must be an integer, got \"abc\""),
    ("ratio", 2, "field 'ratio' must be a number in [0, 0.95]"),
    ("batch", 0, "field 'batch' must be a positive integer"),
    ("method", "fast", "field 'method' must be one of"),
    ("opset", 7, "field 'opset' must be an opset in"),
    ("schedule", [1, "x"], "field 'schedule' must be a list of token counts"),
    ("input_shape", [2, 3, 64, 64], "does not fit vim_t, which takes 3x32x32 images"),
    ("overrides", {"depth": 0}, "field 'overrides' does not describe a vim_t"),
    ("model", "vim_xl", "field 'model' must be one of"),
])
def test_manifest_fields_are_checked(capsys, pair, field, value, phrase):
    json_path = pair.with_suffix(".json")
    record = json.loads(json_path.read_text())
    record[field] = value
    json_path.write_text(json.dumps(record))
    before = snapshot(pair.parent)
    for command in (["validate", "--onnx", pair], ["bench", "--onnx", pair, "--iters", "1"]):
        code, out, err = run(capsys, *command)
        assert_one_line_error(code, out, err, f"manifest {json_path}", phrase, "re-export")
    assert snapshot(pair.parent) == before


def test_onnx_of_one_model_with_the_manifest_of_another(capsys, pair):
    """A vim_t file beside a vim_digits manifest that claims its sha256: refused before any run."""
    json_path = pair.with_suffix(".json")
    record = json.loads(json_path.read_text())
    record.update(model="vim_digits", overrides={}, input_shape=[2, 1, 32, 32], schedule=[0] * 8,
                  tokens_per_layer=[65] * 8)
    json_path.write_text(json.dumps(record))
    for command in (["validate", "--onnx", pair], ["bench", "--onnx", pair, "--iters", "1"]):
        code, out, err = run(capsys, *command)
        assert_one_line_error(code, out, err, "takes input images of shape (2, 3, 32, 32)", "vim_digits",
                              "(2, 1, 32, 32)", "do not belong together")


# ---------------------------------------------------------------------------------------------
# Writing: unwritable folders, full disks, atomic pairs, signals, concurrent writers


def test_read_only_folder_is_refused_before_the_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    prefix = []
    if os.geteuid() == 0:  # root writes anywhere: drop the capability that lets it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv (util-linux) is missing to drop CAP_DAC_OVERRIDE")
        prefix = ["setpriv", "--bounding-set=-dac_override"]
    try:
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.run([*prefix, sys.executable, *CLI, "export", "vim_t", *MICRO, "-o", str(folder / "x.onnx")],
                              capture_output=True, text=True, env=env, timeout=300)
        assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, f"cannot write into {folder}",
                              "Permission denied")
        assert "exporting" not in proc.stdout  # refused before the export started
        assert not list(folder.iterdir())
    finally:
        folder.chmod(0o755)


def test_a_real_write_error_leaves_nothing(tmp_path):
    """The file-size limit makes the kernel refuse the ONNX write (EFBIG), as a full disk would."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, resource.RLIM_INFINITY))

    proc = run_process("export", "vim_t", *MICRO, "-o", tmp_path / "x.onnx", preexec_fn=limit_file_size)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "could not write", "x.onnx",
                          "File too large", "nothing was written")
    assert not list(tmp_path.iterdir())


def test_disk_full_while_writing_the_manifest_leaves_no_onnx(capsys, tmp_path, monkeypatch):
    real = artifacts._write_all

    def full_on_json(fd, data):
        if data.startswith(b"{"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(artifacts, "_write_all", full_on_json)
    code, out, err = run(capsys, "export", "vim_t", *MICRO, "-o", tmp_path / "x.onnx")
    assert_one_line_error(code, out, err, "could not write", "x.json", "No space left on device",
                          "nothing was written")
    assert not list(tmp_path.iterdir())  # neither x.onnx nor a temporary


def test_second_publish_failing_removes_the_first(tmp_path, monkeypatch):
    real = artifacts._publish

    def fail_on_json(tmp, path, force):
        if path.suffix == ".json":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(tmp, path, force)

    monkeypatch.setattr(artifacts, "_publish", fail_on_json)
    with pytest.raises(UserError, match="could not write .*x.json .Input/output error.; nothing was written"):
        artifacts.write_files([(tmp_path / "x.onnx", b"graph"), (tmp_path / "x.json", b"{}")])
    assert not list(tmp_path.iterdir())


def test_pair_is_published_without_replacing_unless_forced(tmp_path):
    onnx_path, json_path = tmp_path / "x.onnx", tmp_path / "x.json"
    artifacts.write_files([(onnx_path, b"one"), (json_path, b"{1}")])
    json_path.unlink()  # a lone leftover .onnx of some other run
    with pytest.raises(UserError, match="x.onnx already exists; pass `force` .*appeared while this command ran"):
        artifacts.write_files([(onnx_path, b"two"), (json_path, b"{2}")])
    assert snapshot(tmp_path) == {Path("x.onnx"): b"one"}  # kept, and no x.json published alone
    artifacts.write_files([(onnx_path, b"two"), (json_path, b"{2}")], force=True)
    assert snapshot(tmp_path) == {Path("x.onnx"): b"two", Path("x.json"): b"{2}"}
    assert oct(onnx_path.stat().st_mode & 0o777) == "0o644"


def test_publishing_without_hard_links_is_still_exclusive(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    artifacts.write_files([(tmp_path / "a.onnx", b"1"), (tmp_path / "a.json", b"{}")])
    with pytest.raises(UserError, match="a.onnx already exists"):
        artifacts.write_files([(tmp_path / "a.onnx", b"2"), (tmp_path / "a.json", b"{}")])
    assert snapshot(tmp_path) == {Path("a.onnx"): b"1", Path("a.json"): b"{}"}


@pytest.mark.parametrize("signum,code,message", [(signal.SIGTERM, 143, "aborted (SIGTERM)"),
                                                  (signal.SIGINT, 130, "aborted (interrupted)")])
def test_signal_during_the_write_removes_temporaries(capsys, tmp_path, monkeypatch, signum, code, message):
    """SIGTERM cleans up like Ctrl-C (SIGINT): a real signal arrives while the ONNX temporary is
    half written."""
    real = artifacts._write_all
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def interrupted(fd, data):
        real(fd, data[: len(data) // 2])  # a half-written temporary exists now
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        os.kill(os.getpid(), signum)
        real(fd, data[len(data) // 2:])

    monkeypatch.setattr(artifacts, "_write_all", interrupted)
    got, out, err = run(capsys, "export", "vim_t", *MICRO, "-o", tmp_path / "x.onnx")
    assert got == code and "Traceback" not in err and message in err
    assert len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the CLI restores the handlers


def test_two_concurrent_exports_to_one_output(tmp_path):
    """Without --force, exactly one of two simultaneous exports writes c.onnx + c.json; the other
    says the file exists. The pair left is consistent."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "200"}
    argv = [sys.executable, *CLI, "export", "vim_t", *MICRO, "-o", str(tmp_path / "c.onnx")]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    code, out, err = next(r for r in results if r[0] == 2)
    assert_one_line_error(code, out, err, "c.onnx", "already exist", "--force")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.onnx"]
    assert json.loads((tmp_path / "c.json").read_text())["onnx_sha256"] == file_sha256(tmp_path / "c.onnx")


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _micro_state():
    return create_model("vim_t", seed=3, **MICRO_CONFIG).state_dict()


@pytest.mark.parametrize("make,phrase", [
    (lambda p: p.write_bytes(bytes((i * 7919) % 251 for i in range(4096))), "is not a PyTorch checkpoint"),
    (lambda p: p.write_text("epoch 3: loss 0.12\n"), "is a text file, not a PyTorch checkpoint"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: torch.save({"model": _micro_state(), "args": argparse_namespace()}, p), "Python objects besides tensors"),
])
def test_checkpoint_messages(capsys, tmp_path, make, phrase):
    path = tmp_path / "w.pth"
    make(path)
    code, out, err = run(capsys, "export", "vim_t", *MICRO, "--checkpoint", path, "-o", tmp_path / "x.onnx")
    assert_one_line_error(code, out, err, f"checkpoint {path}", phrase)
    assert "weights_only" not in err
    assert not (tmp_path / "x.onnx").exists()


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=0.1)


def test_checkpoint_with_nan_weights_is_refused(capsys, tmp_path):
    state = _micro_state()
    state["layers.0.mixer.D"][3] = float("nan")
    state["head.bias"][0] = float("inf")
    path = tmp_path / "nan.pth"
    torch.save({"model": state}, path)
    code, out, err = run(capsys, "export", "vim_t", *MICRO, "--checkpoint", path, "-o", tmp_path / "x.onnx")
    assert_one_line_error(code, out, err, "NaN or Inf", "2 tensor(s)", "layers.0.mixer.D", "head.bias")


def test_eval_says_the_weights_are_random(capsys, tmp_path):
    from PIL import Image

    for label in ("3", "7"):  # vim_t has 1000 classes: folders named by label index
        (tmp_path / label).mkdir()
        Image.new("RGB", (40, 40), color=(30, 90, 200)).save(tmp_path / label / "0.png")
    code, out, err = run(capsys, "eval", "vim_t", "--data", tmp_path, "--limit", "1", "--json", tmp_path / "r.json")
    assert code == 0, out + err
    assert "seeded random weights" in " ".join(out.split()) and "chance level" in " ".join(out.split())
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["random_weights"] is True and record["weights"] is None


# ---------------------------------------------------------------------------------------------
# Merge flags and their help


def test_option_layers_points_to_the_layers_flag(capsys, tmp_path):
    for command in (["export", "vim_t", *MICRO, "-o", tmp_path / "x.onnx"], ["eval", "vim_digits"],
                    ["bench", "--torch", "vim_t", *MICRO]):
        code, out, err = run(capsys, *command, "--ratio", "0.5", "--option", "layers=2,5")
        assert_one_line_error(code, out, err, "give merge layers with --layers")
    assert not list(tmp_path.iterdir())


def test_library_refuses_layers_given_as_text():
    import mame_deploy

    model = create_model("vim_t", **MICRO_CONFIG)
    with pytest.raises(UserError, match="merge layers must be a list of block numbers"):
        mame_deploy.patch(model, ratio=0.5, layers="0")


def test_export_takes_layers(capsys, tmp_path):
    micro3 = [a if a != "depth=1" else "depth=3" for a in MICRO]
    code, out, err = run(capsys, "export", "vim_t", *micro3, "--ratio", "0.5", "--layers", "1", "-o", tmp_path / "l.onnx")
    assert code == 0, out + err
    manifest = json.loads((tmp_path / "l.json").read_text())
    assert manifest["schedule"] == [0, 8, 0] and manifest["options"]["layers"] == [1]
    assert "after blocks 1" in out
    code, out, err = run(capsys, "export", "vim_t", *micro3, "--ratio", "0.5", "--layers", "2", "-o", tmp_path / "z.onnx")
    assert_one_line_error(code, out, err, "merge layer 2 is out of range")
    code, out, err = run(capsys, "export", "vim_t", *micro3, "--schedule", "0:4", "--layers", "1",
                         "-o", tmp_path / "z.onnx")
    assert_one_line_error(code, out, err, "--layers goes with --ratio")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.json", "l.onnx"]


def _help(command: str) -> dict:
    import typer.main

    from mame_deploy.cli.main import app

    return {p.name: p.help or "" for p in typer.main.get_command(app).commands[command].params}


def test_help_states_the_bounds_the_checks_use(capsys, tmp_path):
    for command in ("export", "eval"):
        assert f"[0, {MAX_RATIO}]" in _help(command)["ratio"]
        assert "exclude" in _help(command)["schedule"]
    assert f"[0, {MAX_RATIO}]" in _help("sweep")["ratios"]
    assert "--ratio" in _help("export")["layers"] and "layers" in _help("bench")
    code, out, err = run(capsys, "export", "vim_t", *MICRO, "--ratio", str(MAX_RATIO + 0.01), "-o", tmp_path / "x.onnx")
    assert_one_line_error(code, out, err, f"--ratio must lie in [0, {MAX_RATIO}]")
    code, out, err = run(capsys, "export", "vim_t", *MICRO, "--ratio", "0.5", "--schedule", "0:2",
                         "-o", tmp_path / "x.onnx")
    assert_one_line_error(code, out, err, "either --ratio or --schedule, not both")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Section 3: what a newcomer meets


def test_export_prints_one_line_per_stage_into_a_pipe(capsys, tmp_path):
    code, out, err = run(capsys, "export", "vim_t", *MICRO, "-o", tmp_path / "p.onnx")
    assert code == 0, err
    lines = out.splitlines()
    stages = [line for line in lines if line.endswith(" ...")]
    assert [s.split()[0] for s in stages] == ["building", "exporting", "writing"], lines
    assert stages[0].startswith("building the PyTorch model (vim_t, seeded random weights)")


def test_bench_table_names_threads_and_warns_when_loaded(capsys, tmp_path):
    code, out, err = run(capsys, "bench", "--torch", "vim_t", *MICRO, "--threads", "1", "--batch-sizes", "1",
                         "--warmup", "0", "--iters", "1", "--json", tmp_path / "b.json")
    assert code == 0, out + err
    assert "1 thread;" in out
    report = json.loads((tmp_path / "b.json").read_text())
    assert [r["threads"] for r in report["rows"]] == [1]
    assert report["environment"]["load_average_1min"] is not None
    # the warning itself: other work competing for the cores the runtime uses
    assert bench.load_warning(2, 1.5, 2) is not None and "--threads 1" in bench.load_warning(2, 1.5, 2)
    assert bench.load_warning(2, 0.1, 2) is None and bench.load_warning(1, 0.9, 2) is None
    assert bench.load_warning(None, 9.0, 2) is None  # GPU rows: no CPU threads to compete
    assert 1 <= bench.physical_cores() <= os.cpu_count()


def _git(*args):
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_readme_outputs_are_ignored_and_no_tracked_file_is():
    ignored = _git("check-ignore", "vim_s.json", "vim_s.onnx", "vim_digits.pt", "vim_s.plan").stdout.split()
    assert ignored == ["vim_s.json", "vim_s.onnx", "vim_digits.pt", "vim_s.plan"]
    assert _git("ls-files", "-ci", "--exclude-standard").stdout == ""  # nothing in the repository is hidden
    assert _git("check-ignore", "docs/sweep_vim_digits.json", "models/weights/vim_digits.pt").stdout == ""


def test_sdist_carries_the_test_helpers(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                           "print(build_meta.build_sdist(sys.argv[1]))", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import tarfile

    with tarfile.open(tmp_path / proc.stdout.split()[-1]) as sdist:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in sdist.getnames()}
    assert {"tests/conftest.py", "tests/shape_expr.py", "tests/test_cli_errors.py", "MANIFEST.in"} <= names
    assert not any("__pycache__" in n for n in names)
