"""Serving on Triton Inference Server (PyTriton), the Triton model repository, the load test.

Real servers run as ``mame-deploy serve`` subprocesses on 127.0.0.1 and free ports, serving an
exported vim_digits merged (dynamic batch) and unmerged (static batch 4, padded), and the
PyTorch runner; every wait is bounded in time and every loop in count. Tests that need PyTriton
or tritonclient skip with the reason where they are not installed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from mame_deploy import manifest as manifests
from mame_deploy import source as sources
from mame_deploy.cli.main import main
from mame_deploy.errors import UserError

try:
    import pytriton  # noqa: F401
    HAVE_PYTRITON = True
except ImportError:
    HAVE_PYTRITON = False
try:
    import tritonclient.grpc  # noqa: F401
    import tritonclient.http  # noqa: F401
    HAVE_CLIENT = True
except ImportError:
    HAVE_CLIENT = False

needs_server = pytest.mark.skipif(not (HAVE_PYTRITON and HAVE_CLIENT),
                                  reason="PyTriton/tritonclient not installed (pip install 'mame-deploy[serve]')")
needs_client = pytest.mark.skipif(not HAVE_CLIENT, reason="tritonclient not installed (pip install 'mame-deploy[serve]')")

HOST = "127.0.0.1"
STATIC_BATCH = 4
MAX_BATCH = 8
START_TIMEOUT_S = 150
STOP_TIMEOUT_S = 60
MERGED, UNMERGED, TORCH = "vim_digits_mame_r0.5", "vim_digits", "vim_digits_mame_r0.3"


# ---------------------------------------------------------------------------------------------
# Helpers


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def leftover_state() -> dict:
    """What a Triton server could leave behind: shared memory, its temp folders, backend stubs."""
    tmp = Path("/tmp")
    shm = {p.name for p in Path("/dev/shm").iterdir()} if Path("/dev/shm").is_dir() else set()
    return {
        "shm": {n for n in shm if n.startswith(("pytrtion", "psm_"))},
        "tmp": {p.name for p in tmp.iterdir() if p.name.startswith(("folder", "python_env_", "mame-deploy-serve-"))},
        "stubs": {p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _is_stub(p)},
    }


def _is_stub(proc: Path) -> bool:
    try:
        return b"triton_python_backend_stub" in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def new_leftovers(before: dict) -> dict:
    after = leftover_state()
    return {k: sorted(after[k] - before[k]) for k in after if after[k] - before[k]}


class ServeProcess:
    """``mame-deploy serve ARGS`` in a subprocess, output in a file, ready when Triton says so."""

    def __init__(self, args: list[str], log: Path, metrics: bool = True, session: bool = False):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log = log
        ports = ["--host", HOST, "--http-port", self.http, "--grpc-port", self.grpc]
        ports += ["--metrics-port", self.metrics] if metrics else ["--no-metrics"]
        self.before = leftover_state()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mame_deploy.cli.main", "serve", *map(str, args), *map(str, ports)],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"},
                start_new_session=session,  # its own process group: a terminal's Ctrl-C reaches all of it
            )
        self.url = f"{HOST}:{self.http}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, models: list[str]) -> None:
        """Until every model answers ready (the server's own /v2/health/ready is up before
        PyTriton has loaded the models into it)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.output()}")
            if all(self._ready(f"/v2/models/{m}/ready") for m in models):
                return
            time.sleep(0.5)
        self.kill()
        pytest.fail(f"serve was not ready after {START_TIMEOUT_S} s:\n{self.output()}")

    def stop(self, sig, group: bool = False) -> int:
        if group:
            os.killpg(self.proc.pid, sig)  # what Ctrl-C in a terminal does: serve and tritonserver get it
        else:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"serve did not stop within {STOP_TIMEOUT_S} s of {sig!r}:\n{self.output()}")

    def _ready(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url}{path}", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """End a server a test left running: SIGTERM (it cleans up), SIGKILL if that hangs."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)

    def pending(self, model: str) -> int:
        with urllib.request.urlopen(f"http://{HOST}:{self.metrics}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("nv_inference_pending_request_count") and f'model="{model}"' in line:
                    return int(float(line.rsplit(" ", 1)[1]))
        return 0


def http_infer(url: str, model: str, images: np.ndarray, datatype: str = "FP32") -> np.ndarray:
    import tritonclient.http as th

    client = th.InferenceServerClient(url, connection_timeout=60, network_timeout=60)
    try:
        inp = th.InferInput("images", list(images.shape), datatype)
        inp.set_data_from_numpy(images)
        return client.infer(model, [inp]).as_numpy("logits")
    finally:
        client.close()


def grpc_infer(port: int, model: str, images: np.ndarray) -> np.ndarray:
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(f"{HOST}:{port}")
    try:
        inp = tg.InferInput("images", list(images.shape), "FP32")
        inp.set_data_from_numpy(images)
        return client.infer(model, [inp], client_timeout=60).as_numpy("logits")
    finally:
        client.close()


@functools.lru_cache(maxsize=1)
def _digits() -> np.ndarray:
    from mame_deploy.data import digits_dataset

    return digits_dataset("test", 32).images[:16].numpy().astype(np.float32)


def digits_images(n: int) -> np.ndarray:
    """The first ``n`` (<= 16) held-out digits images: real inputs, so no merge decision is a near-tie."""
    return _digits()[:n].copy()


def torch_logits(record: dict, images: np.ndarray) -> np.ndarray:
    model = sources.build_model(manifests.source_from_manifest(record), record["schedule"]).eval()
    with torch.inference_mode():
        return model(torch.from_numpy(images)).numpy()


def assert_close_to_torch(served: np.ndarray, reference: np.ndarray) -> None:
    scale = float(np.abs(reference).max())
    assert served.shape == reference.shape
    assert float(np.abs(served - reference).max()) <= 1e-3 * scale
    assert (served.argmax(1) == reference.argmax(1)).all()


# ---------------------------------------------------------------------------------------------
# Fixtures: the exports and one server for the module


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """vim_digits merged (ratio 0.5, dynamic batch) and unmerged (static batch 4)."""
    from mame_deploy.manifest import Source
    from mame_deploy.onnx_export import export

    folder = tmp_path_factory.mktemp("serve-exports")
    merged = export(Source("vim_digits", ratio=0.5), folder / "merged.onnx", batch=None)
    unmerged = export(Source("vim_digits"), folder / "unmerged.onnx", batch=STATIC_BATCH)
    return {"merged": merged.onnx_path, "unmerged": unmerged.onnx_path}


@pytest.fixture(scope="module")
def server(exports, tmp_path_factory):
    """Both exports, one runner thread each."""
    if not (HAVE_PYTRITON and HAVE_CLIENT):
        pytest.skip("PyTriton/tritonclient not installed (pip install 'mame-deploy[serve]')")
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    proc = ServeProcess([exports["merged"], exports["unmerged"], "--threads", "1", "--max-batch", MAX_BATCH], log)
    proc.wait_ready([MERGED, UNMERGED])
    yield proc
    proc.kill()  # the last test stops it with SIGTERM; this only ends a run that failed before


# ---------------------------------------------------------------------------------------------
# The served callable, without a server


class FakeRunner:
    """Logits = the mean of each image, repeated over 10 classes; records the batch it got."""

    def __init__(self):
        self.batches = []

    def infer(self, feed, check_inputs=True):
        images = feed["images"]
        self.batches.append(len(images))
        return {"logits": np.repeat(images.reshape(len(images), -1).mean(1, keepdims=True), 10, axis=1)}


def served(fixed_batch=None, pad=False, max_batch=8):
    from mame_deploy.serve import ServedModel

    return ServedModel(name="m", backend="fake", record={"model": "m", "ratio": 0.0}, input_shape=(1, 2, 2),
                       num_classes=10, max_batch=max_batch, fixed_batch=fixed_batch, make_runner=FakeRunner,
                       pad_to_power_of_two=pad)


def test_a_formed_batch_is_padded_to_the_static_batch_and_split_per_request():
    from mame_deploy.serve import BatchInference

    runner = FakeRunner()
    call = BatchInference(served(fixed_batch=4, max_batch=4), runner)
    requests = [{"images": np.full((1, 1, 2, 2), 1.0, np.float32)}, {"images": np.full((2, 1, 2, 2), 2.0, np.float32)}]
    out = call(requests)
    assert runner.batches == [4]  # 3 images padded to the file's batch
    assert [o["logits"].shape for o in out] == [(1, 10), (2, 10)]
    assert out[0]["logits"][0, 0] == 1.0 and (out[1]["logits"] == 2.0).all()


def test_cuda_graph_batches_are_padded_to_powers_of_two():
    model = served(pad=True, max_batch=12)
    assert [model.run_batch(n) for n in (1, 2, 3, 5, 9, 12)] == [1, 2, 4, 8, 12, 12]
    assert model.warmup_batches() == [1, 2, 4, 8, 12]
    assert served().run_batch(3) == 3


@pytest.mark.parametrize("bad, message", [
    (np.full((1, 1, 2, 2), np.nan, np.float32), "request 2 of 2 batched together has 4 NaN/Inf value(s)"),
    (np.full((1, 1, 2, 2), np.inf, np.float32), "request 2 of 2 batched together has 4 NaN/Inf value(s)"),
    (np.zeros((0, 1, 2, 2), np.float32), "request 2 of 2 batched together has an empty batch"),
])
def test_bad_requests_in_a_formed_batch_name_the_request(bad, message):
    from mame_deploy.serve import BadRequest, BatchInference

    runner = FakeRunner()
    call = BatchInference(served(), runner)
    with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        call([{"images": np.zeros((1, 1, 2, 2), np.float32)}, {"images": bad}])
    assert runner.batches == []  # nothing ran
    assert info.value.__traceback__ is None  # what PyTriton formats for the client: one line


def test_model_names_and_parameters_come_from_the_manifest():
    from mame_deploy.triton_repo import manifest_parameters, model_name

    assert model_name({"model": "vim_s", "method": "mame", "ratio": 0.0}) == "vim_s"
    assert model_name({"model": "vim_s", "method": "mame", "ratio": 0.5}) == "vim_s_mame_r0.5"
    name = model_name({"model": "vim_s", "method": "tome", "ratio": 0.5, "schedule_spec": "3:5,6:5"})
    assert name.startswith("vim_s_tome_s") and len(name) == len("vim_s_tome_s") + 8
    params = manifest_parameters({"model": "vim_s", "schedule": [1, 0], "ratio": 0.5, "checkpoint": None})
    assert params == {"mame.model": "vim_s", "mame.schedule": "[1, 0]", "mame.ratio": "0.5", "mame.checkpoint": "null"}


def test_loadtest_bounds_urls_and_server_statistics():
    from mame_deploy.loadtest import Budget, pair_baselines, parse_levels, parse_url, server_side, ModelInfo

    assert parse_url("127.0.0.1:8000") == ("http", "127.0.0.1:8000")
    assert parse_url("grpc://localhost:8001/") == ("grpc", "localhost:8001")
    assert parse_levels("32,1,8,8") == [1, 8, 32]
    budget = Budget(3)
    assert [budget.take() for _ in range(5)] == [True, True, True, False, False]
    before = {"images": 10, "executions": 5, "queued": 10, "queue_ns": 0, "batches": 5, "batch_ns": 50_000_000}
    after = {"images": 70, "executions": 15, "queued": 40, "queue_ns": 60_000_000, "batches": 15, "batch_ns": 250_000_000}
    assert server_side(before, after) == {"server_batch": 6.0, "server_executions": 10, "server_compute_ms": 20.0,
                                          "server_queue_ms": 2.0}
    assert server_side(None, after)["server_batch"] is None and server_side(after, after)["server_batch"] is None

    def info(name, ratio):
        return ModelInfo(name, "images", "FP32", [1, 32, 32], 8, "logits",
                         {"mame.model": "vim_digits", "mame.ratio": ratio, "mame.schedule_spec": "null"})

    infos = [info("m", "0.5"), info("u", "0.0"), ModelInfo("x", "in", "FP32", [3], 4, "out")]
    assert pair_baselines(infos) == {"m": "u"}
    assert pair_baselines(infos, baseline="x") == {"m": "x", "u": "x"}
    with pytest.raises(UserError, match="`baseline` 'y' is not among the models"):
        pair_baselines(infos, baseline="y")
    with pytest.raises(UserError, match="over m's maximum batch of 8"):
        infos[0].request_shape(9)


def test_leftovers_of_a_forced_exit_are_found_and_removed_only_for_this_server(tmp_path):
    """What Triton leaves when forced to exit -- its shared memory, a model folder naming this
    server's workspace, an empty backend environment, a backend stub started from the
    workspace -- is removed; another server's folder is not."""
    import tempfile

    from mame_deploy.serve import Leftovers

    workspace = tmp_path / "workspace"
    workspace.mkdir()
    leftovers = Leftovers.before_start(workspace)
    ours = Path(tempfile.mkdtemp(prefix="folder", dir="/tmp"))
    (ours / "config.pbtxt").write_text(f'parameters {{ key: "workspace-path" value {{ string_value: "{workspace}" }} }}')
    theirs = Path(tempfile.mkdtemp(prefix="folder", dir="/tmp"))
    (theirs / "config.pbtxt").write_text('parameters { key: "workspace-path" value { string_value: "/elsewhere" } }')
    env = Path(tempfile.mkdtemp(prefix="python_env_", dir="/tmp"))
    shm = Path("/dev/shm") / f"{leftovers.shm_prefix}test-{os.getpid()}"
    stub = workspace / "triton_python_backend_stub"
    stub.symlink_to("/bin/sleep")
    proc = subprocess.Popen([str(stub), "60"])
    try:
        if Path("/dev/shm").is_dir():
            shm.write_bytes(b"x")
        deadline = time.monotonic() + 10
        while proc.pid not in leftovers.find()["processes"] and time.monotonic() < deadline:
            time.sleep(0.05)
        found = leftovers.remove()
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert set(found["folders"]) == {ours, env} and found["processes"] == [proc.pid]
        assert not ours.exists() and not env.exists() and not shm.exists() and not workspace.exists()
        assert theirs.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        for folder in (ours, theirs, env):
            shutil.rmtree(folder, ignore_errors=True)
        shm.unlink(missing_ok=True)


def test_with_baseline_serves_the_unmerged_twin_and_names_must_differ(exports, tmp_path):
    from mame_deploy.cli.serve import _served_models
    from mame_deploy.manifest import Source
    from mame_deploy.serve import Server, artifact_model

    models = _served_models(["vim_digits"], [], True, tmp_path, "cpu", 1, False, 4,
                            lambda name: Source(name, ratio=0.3))
    assert [(m.name, m.backend, m.max_batch, m.merged) for m in models] == [
        (TORCH, "torch", 4, True), (UNMERGED, "torch", 4, False)]
    assert models[0].parameters()["mame.schedule"] != models[1].parameters()["mame.schedule"]
    twice = [artifact_model(exports["unmerged"]), artifact_model(exports["unmerged"])]
    with pytest.raises(UserError, match="two models would both be served as 'vim_digits'; give each its own `name`"):
        Server(twice)


# ---------------------------------------------------------------------------------------------
# PyTriton's environment


def test_libpython_trap_fix_and_message(monkeypatch):
    from mame_deploy import serve

    libdir = serve.python_library_dir()
    env = {"LD_LIBRARY_PATH": "/opt/x:/usr/lib"}
    added = serve.fix_library_path(env)
    if libdir is None:
        assert added is None and env["LD_LIBRARY_PATH"] == "/opt/x:/usr/lib"
    else:
        assert added == libdir and env["LD_LIBRARY_PATH"].split(":") == [libdir, "/opt/x", "/usr/lib"]
        serve.fix_library_path(env)  # idempotent
        assert env["LD_LIBRARY_PATH"].split(":").count(libdir) == 1
    line = serve.explain_load_failure("load failed: AttributeError: '_thread.RLock' object has no attribute "
                                      "'_recursion_count'\nAt: ...")
    assert "LD_LIBRARY_PATH=" in line and "libpython" in line and "\n" not in line
    assert serve.explain_load_failure("version 1 is at UNAVAILABLE state\nmore") == "version 1 is at UNAVAILABLE state"


def test_numpy_2_and_missing_pytriton_are_one_line_errors(monkeypatch):
    from mame_deploy import serve

    with pytest.raises(UserError, match=r"NumPy 1.x .*pip install 'numpy<2'"):
        serve.check_numpy("2.1.0")
    serve.check_numpy("1.26.4")
    monkeypatch.setitem(sys.modules, "pytriton", None)
    monkeypatch.setitem(sys.modules, "pytriton.triton", None)
    with pytest.raises(UserError, match=r"pip install 'mame-deploy\[serve\]'"):
        serve.require_pytriton()


def test_a_missing_stub_libpython_is_found_before_starting(tmp_path):
    """The stub links libpython3.X.so.1.0 by name: where the loader would find none (a python3
    linked statically, the system's library not installed), serve says so in one line."""
    from mame_deploy import serve

    if not sys.platform.startswith("linux"):
        pytest.skip("the dynamic loader's search is Linux's")
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / serve.STUB_LIBPYTHON).write_bytes(b"")
    nothing = dict(system_dirs=(), ldconfig_cache=lambda: "\tlibfoo.so.1 (libc6,x86-64) => /lib/libfoo.so.1\n")
    assert serve.stub_libpython_missing({"LD_LIBRARY_PATH": f"/nonexistent:{lib}"}, **nothing) is None
    assert serve.stub_libpython_missing({}, **nothing) == serve.STUB_LIBPYTHON
    cached = f"\t{serve.STUB_LIBPYTHON} (libc6,x86-64) => /usr/lib/{serve.STUB_LIBPYTHON}\n"
    assert serve.stub_libpython_missing({}, system_dirs=(), ldconfig_cache=lambda: cached) is None
    assert serve.stub_libpython_missing({}, system_dirs=[str(lib)], ldconfig_cache=lambda: "") is None
    assert serve.stub_libpython_missing({}, system_dirs=(), ldconfig_cache=lambda: None) is None  # cannot tell
    line = serve.explain_missing_libpython(serve.STUB_LIBPYTHON)
    assert serve.STUB_LIBPYTHON in line and "LD_LIBRARY_PATH" in line and "\n" not in line


def _fake_numpy(folder: Path, version: str) -> Path:
    (folder / "numpy").mkdir(parents=True)
    (folder / "numpy" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    return folder


@pytest.mark.skipif(importlib.util.find_spec("zmq") is None, reason="zmq (PyTriton's proxy needs it) not installed")
def test_the_stub_ignores_pythonpath_and_the_hook_hands_it_folders(tmp_path, monkeypatch):
    """Triton's backend stub runs an interpreter that ignores PYTHONPATH; folders reach it through
    $MAME_SERVE_STUB_PYTHONPATH and the .pth hook, which NumPy 2 there or no hook make one line."""
    from mame_deploy import serve

    numpy2 = _fake_numpy(tmp_path / "numpy2", "2.0.0")
    numpy1 = _fake_numpy(tmp_path / "numpy1", "1.26.0")
    monkeypatch.setenv("PYTHONPATH", str(numpy2))
    assert serve.stub_probe()["numpy"] == np.__version__  # the stub's view: PYTHONPATH does not count
    (tmp_path / "site").mkdir()
    hook = serve.install_stub_hook(tmp_path / "site")  # a site folder of the probe's own, not site-packages
    assert hook.name == serve.STUB_HOOK_NAME and hook.read_text() == serve.STUB_HOOK
    probe = serve.check_stub((str(numpy1),), site_dir=tmp_path / "site")
    assert probe["applied"] and probe["numpy"] == "1.26.0" and probe["zmq"]
    with pytest.raises(UserError, match=r"stub would import NumPy 2.0.0.*pip install --target DIR 'numpy<2'") as exc:
        serve.check_stub((str(numpy2),), site_dir=tmp_path / "site")
    assert "\n" not in str(exc.value)
    if not serve.stub_probe((str(numpy1),))["applied"]:  # no hook in this environment's site-packages
        with pytest.raises(UserError, match=r"ignores PYTHONPATH and this environment has no hook"):
            serve.check_stub((str(numpy1),))
    monkeypatch.delenv(serve.STUB_SYSPATH_ENV, raising=False)
    with serve.stub_environment((str(numpy1),)):
        assert os.environ[serve.STUB_SYSPATH_ENV] == str(numpy1)
    assert serve.STUB_SYSPATH_ENV not in os.environ
    monkeypatch.setenv(serve.STUB_PYTHONPATH_ENV, f"{numpy1}{os.pathsep}{numpy2}")
    assert serve.ServerConfig().check().stub_pythonpath == (str(numpy1.resolve()), str(numpy2.resolve()))
    monkeypatch.setenv(serve.STUB_PYTHONPATH_ENV, str(tmp_path / "missing"))
    with pytest.raises(UserError, match="MAME_SERVE_STUB_PYTHONPATH: .* is not a folder"):
        serve.ServerConfig().check()


@needs_server
def test_the_libpython_trap_is_detected_when_left_unfixed(exports, monkeypatch):
    """Without this interpreter's libpython first on LD_LIBRARY_PATH, the backend stub loads the
    system's; where that breaks loading, the error says how to fix it in one line."""
    from mame_deploy import serve

    if serve.python_library_dir() is None:
        pytest.skip("this python3 links libpython statically: the stub cannot be pointed at it")
    monkeypatch.setattr(serve, "fix_library_path", lambda environ=None: None)
    monkeypatch.setenv("LD_LIBRARY_PATH", "")
    before = leftover_state()
    http, grpc = free_ports(2)
    model = serve.artifact_model(exports["unmerged"], threads=1)
    server = serve.Server([model], serve.ServerConfig(host=HOST, http_port=http, grpc_port=grpc, metrics_port=None))
    try:
        server.start()
    except UserError as exc:
        assert "LD_LIBRARY_PATH=" in str(exc) and "\n" not in str(exc)
    else:
        pytest.skip("the system libpython works with this python3 here: no trap to detect")
    finally:
        server.stop()
    assert new_leftovers(before) == {}


# ---------------------------------------------------------------------------------------------
# The Triton model repository


@needs_client
def test_triton_repository_for_a_dynamic_and_a_static_export(exports, tmp_path):
    from mame_deploy.triton_repo import parse_config, write_repository

    repo = tmp_path / "repo"
    merged = write_repository(exports["merged"], repo, max_batch=MAX_BATCH)
    unmerged = write_repository(exports["unmerged"], repo)
    assert [e.name for e in merged + unmerged] == [MERGED, UNMERGED]
    record = sources.read_manifest(exports["merged"])
    config = parse_config((repo / MERGED / "config.pbtxt").read_text())
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == MAX_BATCH
    assert list(config.input[0].dims) == [1, 32, 32] and list(config.output[0].dims) == [10]
    assert config.HasField("dynamic_batching")
    assert json.loads(config.parameters["mame.schedule"].string_value) == record["schedule"]
    assert (repo / MERGED / "1" / "model.onnx").read_bytes() == exports["merged"].read_bytes()
    assert json.loads((repo / MERGED / "manifest.json").read_text()) == record
    static = parse_config((repo / UNMERGED / "config.pbtxt").read_text())
    assert static.max_batch_size == 0 and list(static.input[0].dims) == [STATIC_BATCH, 1, 32, 32]
    assert not static.HasField("dynamic_batching")
    assert "static batch of 4" in (repo / UNMERGED / "README.md").read_text()
    with pytest.raises(UserError, match="already exists in the model repository; pass `force`"):
        write_repository(exports["merged"], repo)
    write_repository(exports["merged"], repo, force=True)


@needs_client
def test_config_text_escapes_and_a_broken_config_is_refused():
    from mame_deploy.triton_repo import parse_config, to_pbtxt

    text = to_pbtxt([("name", 'a"b\\c é\n'), ("max_batch_size", 3)])
    config = parse_config(text)
    assert config.name == 'a"b\\c é\n' and config.max_batch_size == 3
    with pytest.raises(UserError, match="did not parse"):
        parse_config("name: x max_batch_size: [")


@needs_server
def test_triton_itself_reads_the_repository(exports, tmp_path):
    """PyTriton's tritonserver has only the Python backend: the repository's models must fail on
    exactly that (the onnxruntime backend is missing), i.e. after Triton read their configs."""
    from pytriton.utils.distribution import get_libs_path, get_root_module_path

    from mame_deploy.triton_repo import write_repository

    repo = tmp_path / "repo"
    write_repository(exports["merged"], repo)
    write_repository(exports["unmerged"], repo)
    root = get_root_module_path() / "tritonserver"
    http, grpc = free_ports(2)
    env = {**os.environ, "LD_LIBRARY_PATH": str(get_libs_path())}
    run = subprocess.run(
        [str(root / "bin" / "tritonserver"), f"--model-repository={repo}", f"--backend-directory={root / 'backends'}",
         f"--http-address={HOST}", f"--http-port={http}", f"--grpc-address={HOST}", f"--grpc-port={grpc}",
         "--allow-metrics=false", "--exit-on-error=true", "--disable-auto-complete-config"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    log = run.stdout + run.stderr
    assert run.returncode != 0
    for name in (MERGED, UNMERGED):
        assert f"failed to load '{name}' version 1: Invalid argument: unable to find backend library for " \
               "backend 'onnxruntime'" in log, log


def test_export_checks_the_triton_repository_before_exporting(tmp_path, capsys):
    (tmp_path / "repo" / UNMERGED).mkdir(parents=True)
    code = main(["export", "vim_digits", "--triton-repo", str(tmp_path / "repo"), "--output", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "already exists in the model repository" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()  # failed before the export


@needs_client
def test_export_cli_helper_writes_the_repository(exports, tmp_path, capsys):
    from mame_deploy.cli.serve import write_triton_repo

    write_triton_repo(tmp_path / "repo", exports["unmerged"], force=False)
    out = capsys.readouterr().out
    assert f"wrote Triton model {tmp_path / 'repo' / UNMERGED}" in out and "static batch of 4" in out
    assert (tmp_path / "repo" / UNMERGED / "config.pbtxt").is_file()


# ---------------------------------------------------------------------------------------------
# CLI errors (no server needed)


@pytest.mark.parametrize("args, message", [
    (["serve", "missing.onnx"], "does not exist"),
    (["serve", "notes.txt"], "serve takes an .onnx, a .plan or a model name"),
    (["serve", "vim_digits", "--name", "a", "--name", "b"], "got 2 --name for 1 artifacts"),
    (["serve", "vim_digits", "--http-port", "9000", "--grpc-port", "9000"], "ports must differ"),
    (["serve", "vim_digits", "--drain-timeout", "99"], "--drain-timeout must be in 1..25"),
    (["serve", "vim_digits", "--name", "bad name"], "not valid for Triton"),
    (["serve", "model.plan"], "TensorRT is needed for serving an engine"),
    (["loadtest", "http://127.0.0.1:1", "--concurrency", "0"], "--concurrency levels must be in 1..256"),
    (["loadtest", "ftp://127.0.0.1:8000"], "use http://HOST:PORT or grpc://HOST:PORT"),
    (["loadtest", "http://127.0.0.1", "--duration", "5"], "needs a host and a port"),
    (["loadtest", "http://127.0.0.1:8000", "--duration", "0"], "--duration must be in (0, 3600]"),
])
def test_serve_and_loadtest_errors_are_one_line(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    if args[0] == "serve" and not HAVE_PYTRITON:
        pytest.skip("serve checks its arguments after finding PyTriton")
    if args[-1].endswith(".plan"):
        from mame_deploy.plugins.trt_aot import tensorrt_available

        if tensorrt_available():
            pytest.skip("TensorRT is installed: nothing to refuse")
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err


@needs_client
def test_loadtest_without_a_server_is_one_line(capsys):
    (port,) = free_ports(1)
    code = main(["loadtest", f"http://{HOST}:{port}", "--duration", "1"])
    err = capsys.readouterr().err
    assert code == 2 and f"no Triton server answers at http://{HOST}:{port}" in err, err


# ---------------------------------------------------------------------------------------------
# A real server


@needs_server
def test_health_metadata_and_manifest_in_the_config(server, exports):
    import tritonclient.http as th

    client = th.InferenceServerClient(server.url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        for name in (MERGED, UNMERGED):
            assert client.is_model_ready(name)
            meta = client.get_model_metadata(name)
            assert meta["versions"] == ["1"]
            assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 32, 32]}]
            assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
        record = sources.read_manifest(exports["merged"])
        config = client.get_model_config(MERGED)
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        assert config["max_batch_size"] == MAX_BATCH and "dynamic_batching" in config
        assert json.loads(params["mame.schedule"]) == record["schedule"] and params["mame.ratio"] == "0.5"
        assert params["mame.onnx_sha256"] == record["onnx_sha256"] and params["mame.backend"] == "onnxruntime"
        static = client.get_model_config(UNMERGED)
        assert static["max_batch_size"] == STATIC_BATCH
        assert static["parameters"]["mame.batching"]["string_value"] == "padded to the static batch 4"
    finally:
        client.close()


@needs_server
def test_served_logits_match_pytorch_over_http_and_grpc(server, exports):
    images = digits_images(6)
    for name, export in ((MERGED, exports["merged"]), (UNMERGED, exports["unmerged"])):
        reference = torch_logits(sources.read_manifest(export), images)
        assert_close_to_torch(http_infer(server.url, name, images[:3]), reference[:3])  # 3 < static batch: padded
        assert_close_to_torch(grpc_infer(server.grpc, name, images[3:]), reference[3:])


def _bad(kind):
    good = np.zeros((1, 1, 32, 32), np.float32)
    if kind == "nan":
        good[0, 0, 3, 3] = np.nan
    if kind == "inf":
        good[0, 0, 0, :5] = -np.inf
    return {
        "shape": (UNMERGED, np.zeros((1, 1, 28, 28), np.float32), "FP32"),
        "dtype": (MERGED, np.zeros((1, 1, 32, 32), np.float64), "FP64"),
        "over max": (MERGED, np.zeros((MAX_BATCH + 1, 1, 32, 32), np.float32), "FP32"),
        "over static": (UNMERGED, np.zeros((STATIC_BATCH + 1, 1, 32, 32), np.float32), "FP32"),
        "nan": (MERGED, good, "FP32"),
        "inf": (UNMERGED, good, "FP32"),
        "empty": (MERGED, np.zeros((0, 1, 32, 32), np.float32), "FP32"),
        "unknown model": ("no_such_model", np.zeros((1, 1, 32, 32), np.float32), "FP32"),
    }[kind]


BAD_MESSAGES = {
    "shape": "unexpected shape for input 'images' for model 'vim_digits'. Expected [-1,1,32,32], got [1,1,28,28]",
    "dtype": f"inference input 'images' data-type is 'FP64', but model '{MERGED}' expects 'FP32'",
    "over max": f"inference request batch-size must be <= {MAX_BATCH} for '{MERGED}'",
    "over static": f"inference request batch-size must be <= {STATIC_BATCH} for 'vim_digits'",
    "nan": "BadRequest: the request has 1 NaN/Inf value(s) in 'images': send finite pixel values",
    "inf": "BadRequest: the request has 5 NaN/Inf value(s) in 'images': send finite pixel values",
    "empty": "input byte size mismatch for input 'images'",
    "unknown model": "Request for unknown model: 'no_such_model' is not found",
}


@needs_server
@pytest.mark.parametrize("kind", list(BAD_MESSAGES))
def test_bad_requests_get_a_clear_error_and_the_server_keeps_serving(server, kind):
    from tritonclient.utils import InferenceServerException

    from mame_deploy.loadtest import first_line

    model, images, datatype = _bad(kind)
    with pytest.raises(InferenceServerException) as info:
        http_infer(server.url, model, images, datatype)
    assert BAD_MESSAGES[kind] in first_line(info.value), info.value
    assert http_infer(server.url, MERGED, digits_images(2)).shape == (2, 10)  # still serving
    assert server.proc.poll() is None


@needs_server
def test_bounded_load_run_without_failures(server, tmp_path, capsys):
    report_path = tmp_path / "load.json"
    code = main(["loadtest", f"http://{server.url}", "--model", MERGED, "--model", UNMERGED,
                 "--concurrency", "1,4", "--duration", "1.5", "--requests", "40", "--warmup", "1",
                 "--json", str(report_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(report_path.read_text())
    assert report["failed"] == 0 and len(report["rows"]) == 4
    for row in report["rows"]:
        assert row["failed"] == 0 and 1 <= row["ok"] <= 40 and row["p99_ms"] >= row["p50_ms"] > 0
        assert row["server_batch"] is not None and 1 <= row["server_batch"] <= row["concurrency"]
        assert row["server_compute_ms"] > 0 and row["server_queue_ms"] >= 0
    assert {(c["merged"], c["unmerged"]) for c in report["comparison"]} == {(MERGED, UNMERGED)}
    from mame_deploy.loadtest import loadtest

    over_grpc = loadtest(f"grpc://{HOST}:{server.grpc}", levels=[2], duration_s=1.0, max_requests=6, warmup=0)
    assert over_grpc["failed"] == 0 and {r["model"] for r in over_grpc["rows"]} == {MERGED, UNMERGED}
    assert all(r["ok"] == 6 and r["server_batch"] for r in over_grpc["rows"])
    assert "load test http://" in out and str(report_path) in out.replace("\n", "")


@needs_server
def test_sigterm_drains_requests_in_flight_and_leaves_nothing(server):
    """Queue requests (one runner thread serves them one at a time, the rest wait in Triton's
    queue), SIGTERM as soon as the first is answered, so the others are in flight: every one is
    answered, the server exits 0, and nothing is left behind. (Waiting for Triton's pending-count
    metric instead raced its 2 s sampling: fast runs answered all before a sample showed them.)"""
    images = np.repeat(digits_images(1), MAX_BATCH, axis=0)
    results, lock = [], threading.Lock()
    sent = 12

    def send():
        try:
            out = http_infer(server.url, MERGED, images)
            with lock:
                results.append(out.shape)
        except Exception as exc:  # recorded, asserted below
            with lock:
                results.append(repr(exc))

    threads = [threading.Thread(target=send, daemon=True) for _ in range(sent)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not results and time.monotonic() < deadline:
        time.sleep(0.002)
    with lock:
        answered_before = len(results)
    assert 1 <= answered_before < sent, f"{answered_before} of {sent} answered before SIGTERM"
    code = server.stop(signal.SIGTERM)
    for t in threads:
        t.join(timeout=STOP_TIMEOUT_S)
    assert results == [(MAX_BATCH, 10)] * sent
    assert code == 0, server.output()
    assert "stopped (SIGTERM)" in server.output()
    assert new_leftovers(server.before) == {}


@needs_server
def test_pytorch_runner_served_then_ctrl_c_stops_cleanly(tmp_path):
    """A model name is served by PyTorch (vim_digits at ratio 0.3); Ctrl-C, sent as a terminal
    sends it (to serve and tritonserver alike), stops it cleanly."""
    import tritonclient.http as th

    from mame_deploy.manifest import Source
    from mame_deploy.source import resolve_checkpoint

    proc = ServeProcess(["vim_digits", "--ratio", "0.3", "--threads", "1"], tmp_path / "serve.log",
                        metrics=False, session=True)
    try:
        proc.wait_ready([TORCH])
        images = digits_images(2)
        served = http_infer(proc.url, TORCH, images)
        client = th.InferenceServerClient(proc.url)
        params = {k: v["string_value"] for k, v in client.get_model_config(TORCH)["parameters"].items()}
        client.close()
        code = proc.stop(signal.SIGINT, group=True)
    finally:
        proc.kill()
    assert params["mame.backend"] == "torch" and params["mame.ratio"] == "0.3"
    model = sources.build_model(resolve_checkpoint(Source("vim_digits", ratio=0.3))).eval()
    assert json.loads(params["mame.schedule"]) == sources.model_schedule(model)
    with torch.inference_mode():
        assert_close_to_torch(served, model(torch.from_numpy(images)).numpy())
    assert code == 0, proc.output()
    assert "stopped (SIGINT)" in proc.output()
    assert new_leftovers(proc.before) == {}
