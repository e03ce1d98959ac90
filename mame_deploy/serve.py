"""Serving exported models on Triton Inference Server, through PyTriton.

PyTriton (``pip install 'mame-deploy[serve]'``) starts a real ``tritonserver`` -- HTTP, gRPC,
health, metadata, statistics, Prometheus metrics -- whose Python backend hands every batch the
dynamic batcher forms to a callable in this process. That callable (:class:`BatchInference`)
runs the very runner ``validate`` and ``bench`` use: onnxruntime for a ``.onnx``, the TensorRT
runner for a ``.plan``, PyTorch eager or a CUDA graph for a model name.

What each served model says about itself comes from its manifest: the name (model + merge
settings), the input shape and maximum batch in the model's metadata, and every manifest entry
as a ``mame.*`` parameter of its config (``GET /v2/models/NAME/config``).

Batching: Triton concatenates requests up to ``max_batch_size``. A file exported with a static
batch N is served with ``max_batch_size`` N and every formed batch is zero-padded to N (the
padded rows are computed and dropped): dynamic batching is what fills that fixed batch. A CUDA
graph runner pads to the next power of two, so only a few graphs are captured.

Bad requests: Triton rejects what the config describes -- wrong dtype, wrong shape, a batch
over the maximum, an unknown model -- before batching. The callable rejects empty batches and
non-finite pixels. PyTriton answers one formed batch with one result, so a request with NaN/Inf
fails the requests batched with it (all get the message, which names the bad request).

The backend stub: Triton runs the Python backend in a stub process with an interpreter of its own
that links ``libpythonX.Y.so.1.0`` by name and ignores PYTHONPATH; it must import NumPy 1.x and
zmq from this environment's site-packages, or from the folders of $MAME_SERVE_STUB_PYTHONPATH,
handed to it by a ``.pth`` hook (:func:`install_stub_hook`) -- so this process can keep NumPy 2.
:func:`check_stub` and :func:`stub_libpython_missing` say before start-up what would fail.

Shutdown (:func:`serve`): Ctrl-C or SIGTERM stop accepting, let Triton finish the
requests in flight (up to the drain timeout), unload the models and remove the workspace. Triton
forced to exit (clients holding connections past the timeout) leaves shared memory, temporary
folders and backend stubs behind; :class:`Leftovers` removes exactly those of this server.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from mame_deploy import manifest as manifests
from mame_deploy import source as sources
from mame_deploy.errors import UserError
from mame_deploy.manifest import INPUT_NAME, OUTPUT_NAME
from mame_deploy.runners import Artifact, open_artifact
from mame_deploy.triton_repo import (DEFAULT_MAX_BATCH, DEFAULT_QUEUE_DELAY_US, check_name, manifest_parameters,
                                     model_name)

SERVE_HINT = "pip install 'mame-deploy[serve]'"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT, DEFAULT_METRICS_PORT = 8000, 8001, 8002
DEFAULT_DRAIN_S = 20
# PyTriton kills tritonserver 30 s after asking it to stop: the drain must end before that.
MAX_DRAIN_S = 25
# Triton endpoints PyTriton's token guards by default; statistics stay open so that
# ``loadtest`` can read the batch sizes the dynamic batcher formed.
RESTRICTED_ENDPOINTS = ("shared-memory", "model-repository", "trace", "logging")
_TMP = Path(tempfile.gettempdir())
_SHM = Path("/dev/shm")

log = logging.getLogger("mame_deploy.serve")


class BadRequest(ValueError):
    """A request the model cannot answer; the message goes to the client.

    PyTriton sends a failed batch's exception to the client formatted with its
    ``__traceback__``: this class shows none, so the client reads the message, not this
    server's stack (the server logs one line per rejected batch).
    """

    @property
    def __traceback__(self):
        return None

    @__traceback__.setter
    def __traceback__(self, value):
        pass


# ---------------------------------------------------------------------------------------------
# What is served


@dataclass
class ServedModel:
    """One model as Triton sees it, and how to make the runner that computes it."""

    name: str
    backend: str                   # onnxruntime, tensorrt, torch or torch-graph
    record: dict                   # the manifest (or, for PyTorch, what it would say)
    input_shape: tuple             # (channels, height, width)
    num_classes: int
    max_batch: int
    fixed_batch: Optional[int]     # static-batch artifacts: every batch is padded to this
    make_runner: Callable[[], object]
    pad_to_power_of_two: bool = False
    device: str = "cpu"
    version: int = 1

    @property
    def merged(self) -> bool:
        return bool(self.record.get("ratio")) or self.record.get("schedule_spec") is not None

    def run_batch(self, n: int) -> int:
        """The batch the runner is called with for ``n`` images."""
        if self.fixed_batch is not None:
            return self.fixed_batch
        if self.pad_to_power_of_two:
            return min(1 << max(n - 1, 0).bit_length(), self.max_batch)
        return n

    def warmup_batches(self) -> list[int]:
        """Every batch size the runner will see, when they are few (graphs to capture)."""
        if self.fixed_batch is not None:
            return [self.fixed_batch]
        if self.pad_to_power_of_two:
            return sorted({self.run_batch(n) for n in range(1, self.max_batch + 1)})
        return [1]

    def parameters(self) -> dict[str, str]:
        """The manifest as Triton config parameters, and how batches reach the runner."""
        params = manifest_parameters(self.record)
        params["mame.backend"] = self.backend
        params["mame.batching"] = (f"padded to the static batch {self.fixed_batch}" if self.fixed_batch
                                   else "padded to a power of two" if self.pad_to_power_of_two else "as formed")
        return params


def _check_max_batch(max_batch: Optional[int]) -> int:
    value = DEFAULT_MAX_BATCH if max_batch is None else max_batch
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"`max_batch` must be at least 1, got {max_batch}")
    return value


def artifact_model(artifact: Union[Artifact, str, Path], device: str = "cpu", threads: Optional[int] = None,
                   max_batch: Optional[int] = None, name: Optional[str] = None) -> ServedModel:
    """An exported ``.onnx`` (onnxruntime) or a ``.plan`` built by ``mame-deploy build``
    (TensorRT, on the GPU), served through the same runner validate and bench use. A static
    batch is served with that batch as the maximum; an engine's profile bounds ``max_batch``."""
    if not isinstance(artifact, Artifact):
        artifact = open_artifact(artifact, device, threads)  # checks the file against its manifest
    record, fixed = artifact.record, artifact.fixed_batch
    if artifact.engine and fixed is None:
        top = int(artifact.engine["batch"]["max"])
        if max_batch is not None and max_batch > top:
            raise UserError(f"{artifact.path} was built for batches up to {top}; pass `max_batch` {top} or less, "
                            "or rebuild it with a larger `max_batch`")
        max_batch = max_batch or top
    return ServedModel(
        name=check_name(name or model_name(record)), backend=artifact.runtime, record=record,
        input_shape=tuple(record["input_shape"][1:]), num_classes=int(record["num_classes"]),
        max_batch=fixed if fixed is not None else _check_max_batch(max_batch), fixed_batch=fixed,
        make_runner=artifact.runner, device=artifact.device,
    )


def torch_model(source, device: str = "cpu", threads: Optional[int] = None, cuda_graph: bool = False,
                max_batch: Optional[int] = None, name: Optional[str] = None) -> ServedModel:
    """A model name with merge settings (a ``manifest.Source``), run by PyTorch."""
    from mame_deploy.flops import relative_gflops
    from mame_deploy.runners import TorchGraphRunner, TorchRunner, check_device

    check_device(device)
    if cuda_graph and device != "cuda":
        raise UserError("`cuda_graph` replays a CUDA graph: pass it with `device` cuda")
    model = sources.build_model(source)
    cfg = model.config
    tokens = sources.tokens_per_layer(model)
    record = {
        **source.as_dict(),
        "schedule": sources.model_schedule(model), "tokens_per_layer": tokens,
        "relative_gflops": round(relative_gflops(cfg, tokens), 6), "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME, "input_shape": ["batch", cfg.in_chans, cfg.img_size, cfg.img_size],
        "batch": None, "num_classes": cfg.num_classes, "device": device,
        "versions": manifests.tool_versions(),
    }
    make = (lambda: TorchGraphRunner(model)) if cuda_graph else (lambda: TorchRunner(model, device, threads))
    return ServedModel(
        name=check_name(name or model_name(record)), backend="torch-graph" if cuda_graph else "torch",
        record=record, input_shape=(cfg.in_chans, cfg.img_size, cfg.img_size), num_classes=cfg.num_classes,
        max_batch=_check_max_batch(max_batch), fixed_batch=None, make_runner=make, pad_to_power_of_two=cuda_graph,
        device=device,
    )


def check_unique_names(models: Sequence[ServedModel]) -> None:
    seen = {}
    for m in models:
        if m.name in seen:
            raise UserError(f"two models would both be served as {m.name!r}; give each its own `name`")
        seen[m.name] = m


# ---------------------------------------------------------------------------------------------
# The callable Triton's Python backend calls


class BatchInference:
    """Runs one formed batch: checks each request, concatenates, pads, runs, splits.

    PyTriton calls it with the list of requests Triton batched together (each a mapping of input
    name to array, batch axis first) and expects one dict of outputs per request.
    """

    def __init__(self, model: ServedModel, runner):
        self.model = model
        self.runner = runner

    def check(self, requests) -> list[np.ndarray]:
        arrays = [np.asarray(r[INPUT_NAME]) for r in requests]
        problems = []
        for i, images in enumerate(arrays):
            where = f"request {i + 1} of {len(arrays)} batched together" if len(arrays) > 1 else "the request"
            if images.ndim == 0 or images.shape[0] == 0:
                problems.append(f"{where} has an empty batch: send at least one image of shape "
                                f"{list(self.model.input_shape)}")
            elif images.dtype.kind == "f" and not np.isfinite(images).all():
                bad = int(images.size - np.isfinite(images).sum())
                problems.append(f"{where} has {bad} NaN/Inf value(s) in {INPUT_NAME!r}: send finite pixel values")
        if problems:
            log.warning("%s: rejected %d request(s): %s", self.model.name, len(arrays), "; ".join(problems))
            raise BadRequest("; ".join(problems))
        return arrays

    def __call__(self, requests):
        arrays = self.check(requests)
        images = np.concatenate(arrays).astype(np.float32, copy=False)
        n = len(images)
        size = self.model.run_batch(n)
        if size > n:
            images = np.concatenate([images, np.zeros((size - n, *images.shape[1:]), np.float32)])
        logits = self.runner.infer({INPUT_NAME: np.ascontiguousarray(images)}, check_inputs=False)[OUTPUT_NAME]
        logits = np.asarray(logits, np.float32)[:n]
        out, start = [], 0
        for a in arrays:
            out.append({OUTPUT_NAME: logits[start:start + len(a)]})
            start += len(a)
        return out


# ---------------------------------------------------------------------------------------------
# PyTriton's environment


def require_pytriton(stub_pythonpath: Optional[Sequence[str]] = None):
    """Import PyTriton, or one line saying how to get it and what it needs -- here and in the
    Python of Triton's backend stub, which must import NumPy 1.x and zmq. ``stub_pythonpath``
    (default: $MAME_SERVE_STUB_PYTHONPATH) are folders the stub looks in first."""
    try:
        import pytriton.triton  # noqa: F401
    except ImportError:
        raise UserError(f"serving needs PyTriton and tritonclient; {SERVE_HINT}") from None
    if stub_pythonpath is None:
        stub_pythonpath = check_stub_pythonpath(env_stub_pythonpath())
    check_stub(tuple(stub_pythonpath))
    return pytriton.triton


# Triton's Python-backend stub runs its own interpreter that ignores PYTHONPATH (as ``python -E``
# does): it imports from the standard library and this environment's site-packages only. Folders
# it should look in first reach it through STUB_SYSPATH_ENV, which ``serve`` sets for tritonserver
# alone, and a one-line ``.pth`` hook in site-packages (:func:`install_stub_hook`) that reads it.
STUB_PYTHONPATH_ENV = "MAME_SERVE_STUB_PYTHONPATH"     # what a user sets (os.pathsep-separated)
STUB_SYSPATH_ENV = "MAME_SERVE_STUB_SYSPATH"           # what tritonserver and its stubs get
STUB_HOOK_NAME = "mame_deploy_stub_path.pth"
STUB_HOOK = (f"import os, sys; sys.path[:0] = [p for p in os.environ.get('{STUB_SYSPATH_ENV}', '').split(os.pathsep) "
             "if p and p not in sys.path]\n")
INSTALL_HOOK = "python3 -c 'from mame_deploy.serve import install_stub_hook; install_stub_hook()'"
STUB_NUMPY_HINT = (f"or keep this environment's NumPy and give the backend stub its own: pip install --target DIR "
                   f"'numpy<2', set {STUB_PYTHONPATH_ENV}=DIR and run {INSTALL_HOOK}")


def env_stub_pythonpath(environ=os.environ) -> tuple[str, ...]:
    return tuple(p for p in environ.get(STUB_PYTHONPATH_ENV, "").split(os.pathsep) if p)


def check_stub_pythonpath(folders: Sequence[Union[str, Path]]) -> tuple[str, ...]:
    out = []
    for folder in folders:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise UserError(f"{STUB_PYTHONPATH_ENV}: {folder} is not a folder")
        out.append(str(path.resolve()))
    return tuple(out)


def install_stub_hook(site_dir: Optional[Union[str, Path]] = None) -> Path:
    """Write the ``.pth`` hook into ``site_dir`` (default: this environment's site-packages).
    It does nothing unless STUB_SYSPATH_ENV is set, which only ``serve`` does, for tritonserver."""
    folder = Path(site_dir or sysconfig.get_paths()["purelib"])
    path = folder / STUB_HOOK_NAME
    path.write_text(STUB_HOOK)
    return path


def check_numpy(version: Optional[str] = None, for_stub: bool = False) -> None:
    """PyTriton 0.7's Python-backend stub is built against NumPy 1.x (its pybind11 predates
    NumPy 2's array-descriptor layout): under NumPy 2 every response comes back empty ('output
    tensor shape does not match size of output'). ``version`` is the NumPy the stub imports."""
    version = version or np.__version__
    if int(version.split(".")[0]) >= 2:
        where = "Triton's Python-backend stub would import" if for_stub else "this is"
        raise UserError(f"PyTriton's Triton Python backend needs NumPy 1.x ({where} NumPy {version}: "
                        f"responses come back empty); pip install 'numpy<2', {STUB_NUMPY_HINT}")


_PROBE = """import json, os, sys
want = [p for p in os.environ.get(%r, "").split(os.pathsep) if p]
out = {"applied": all(p in sys.path for p in want)}
for name in ("numpy", "zmq"):
    try:
        module = __import__(name)
        out[name] = getattr(module, "__version__", "?")
    except Exception as exc:
        out[name] = None
        out[name + "_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
print(json.dumps(out))
""" % STUB_SYSPATH_ENV


def stub_probe(stub_pythonpath: Sequence[str] = (), site_dir: Optional[Union[str, Path]] = None) -> dict:
    """What the stub's interpreter imports: this python3 (the stub finds the same first on PATH)
    with ``-E`` (PYTHONPATH ignored, as in the stub) and the stub's STUB_SYSPATH_ENV. ``site_dir``:
    one more site folder to process first (tests use it for a hook of their own)."""
    env = dict(os.environ)
    env.pop(STUB_SYSPATH_ENV, None)
    if stub_pythonpath:
        env[STUB_SYSPATH_ENV] = os.pathsep.join(stub_pythonpath)
    code = _PROBE if site_dir is None else f"import site; site.addsitedir({str(site_dir)!r})\n" + _PROBE
    try:
        done = subprocess.run([sys.executable, "-E", "-c", code], env=env, capture_output=True, text=True, timeout=120)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        raise UserError(f"could not check what Triton's Python-backend stub imports ({sys.executable} -E: "
                        f"{exc})") from None


def check_stub(stub_pythonpath: Sequence[str] = (), site_dir: Optional[Union[str, Path]] = None) -> dict:
    """One line for each way the backend stub would fail: the stub folders not reaching it (no
    hook), NumPy or zmq missing there (PYTHONPATH does not count), NumPy 2."""
    probe = _cached_probe(tuple(stub_pythonpath), None if site_dir is None else str(site_dir))
    if stub_pythonpath and not probe["applied"]:
        raise UserError(f"{STUB_PYTHONPATH_ENV} is set, but Triton's Python-backend stub ignores PYTHONPATH and "
                        f"this environment has no hook to hand it the folders: run {INSTALL_HOOK} (it writes "
                        f"{STUB_HOOK_NAME} into {sysconfig.get_paths()['purelib']})")
    for name in ("numpy", "zmq"):
        if probe.get(name) is None:
            raise UserError(f"Triton's Python-backend stub cannot import {name} ({probe.get(name + '_error')}): it "
                            f"ignores PYTHONPATH, so install {name} into {sysconfig.get_paths()['purelib']} or put its "
                            f"folder in {STUB_PYTHONPATH_ENV} (with the hook: {INSTALL_HOOK})")
    check_numpy(probe["numpy"], for_stub=True)
    return probe


@functools.lru_cache(maxsize=8)
def _cached_probe(stub_pythonpath: tuple, site_dir: Optional[str]) -> dict:
    return stub_probe(stub_pythonpath, site_dir)


@contextlib.contextmanager
def stub_environment(stub_pythonpath: Sequence[str]):
    """While tritonserver is started (its backend stubs inherit its environment), STUB_SYSPATH_ENV
    holds ``stub_pythonpath``; this process's own imports are not affected."""
    if not stub_pythonpath:
        yield
        return
    before = os.environ.get(STUB_SYSPATH_ENV)
    os.environ[STUB_SYSPATH_ENV] = os.pathsep.join(stub_pythonpath)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(STUB_SYSPATH_ENV, None)
        else:
            os.environ[STUB_SYSPATH_ENV] = before


def python_library_dir() -> Optional[str]:
    """The folder of this interpreter's own ``libpythonX.Y.so`` (None if it is linked statically)."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).is_file():
        return libdir
    return None


def fix_library_path(environ=os.environ) -> Optional[str]:
    """Put this interpreter's libpython first on LD_LIBRARY_PATH (the Python-backend stub links
    ``libpythonX.Y.so`` by name and would otherwise load the system's). Returns the folder added."""
    libdir = python_library_dir()
    if libdir is None:
        return None
    parts = [p for p in environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if parts[:1] != [libdir]:
        environ["LD_LIBRARY_PATH"] = ":".join([libdir] + [p for p in parts if p != libdir])
    return libdir


STUB_LIBPYTHON = f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0"  # what the stub links
_SYSTEM_LIB_DIRS = ("/lib", "/usr/lib", "/lib64", "/usr/lib64", "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
                    "/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu")


def _ldconfig_cache() -> Optional[str]:
    for tool in (shutil.which("ldconfig"), "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        if tool and Path(tool).is_file():
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                return subprocess.run([tool, "-p"], capture_output=True, text=True, timeout=20).stdout
    return None


def stub_libpython_missing(environ=os.environ, system_dirs: Sequence[str] = _SYSTEM_LIB_DIRS,
                           ldconfig_cache: Callable[[], Optional[str]] = _ldconfig_cache) -> Optional[str]:
    """The libpython the Python-backend stub links (``libpython3.X.so.1.0``) when the dynamic
    loader would not find it -- not on LD_LIBRARY_PATH, not in its cache, not in the system's
    folders; None when it is found or this cannot be told (not Linux, no ldconfig)."""
    if not sys.platform.startswith("linux"):
        return None
    dirs = [p for p in environ.get("LD_LIBRARY_PATH", "").split(":") if p] + list(system_dirs)
    if any((Path(d) / STUB_LIBPYTHON).exists() for d in dirs):
        return None
    cache = ldconfig_cache()
    if cache is None or STUB_LIBPYTHON in cache:
        return None
    return STUB_LIBPYTHON


def explain_missing_libpython(soname: str) -> str:
    libdir = sysconfig.get_config_var("LIBDIR")
    how = (f"has no {soname} in {libdir}" if sysconfig.get_config_var("Py_ENABLE_SHARED")
           else "links libpython statically")
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return (f"Triton's Python-backend stub links {soname}, which the dynamic loader cannot find: this python3 "
            f"({sys.executable}, Python {sys.version.split()[0]}) {how}; install the system's libpython{ver} "
            f"package (Debian/Ubuntu: apt install libpython{ver}) or put a folder holding {soname} of Python "
            f"{sys.version.split()[0]} first on LD_LIBRARY_PATH")


LIBPYTHON_SIGNS = ("_recursion_count", "No module named 'numpy'", "No module named 'zmq'",
                   "undefined symbol: Py", "libpython")


def explain_load_failure(message: str) -> str:
    """One line for a model that did not load; the libpython trap gets its fix."""
    if any(sign in message for sign in LIBPYTHON_SIGNS):
        libdir = python_library_dir() or sysconfig.get_config_var("LIBDIR")
        return ("Triton's Python-backend stub loaded another libpython than this python3 "
                f"({sys.executable}, Python {sys.version.split()[0]}); run with "
                f"LD_LIBRARY_PATH={libdir} (or use a python3 built with --enable-shared)")
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


# ---------------------------------------------------------------------------------------------
# Leftovers of a forced exit


@dataclass
class Leftovers:
    """Shared memory, temporary folders and processes a Triton server of this process may leave
    when it is forced to exit; taken before start, removed after stop (only this server's)."""

    workspace: Path
    shm_prefix: str
    tmp_before: set = field(default_factory=set)

    @classmethod
    def before_start(cls, workspace: Path) -> "Leftovers":
        return cls(workspace, f"pytrtion{os.getpid()}-", set(_listdir(_TMP)))

    def find(self) -> dict[str, list]:
        """What is left now: this server's shared memory, its model folders and backend
        environments in the temp folder, and its backend stub processes."""
        shm = [p for p in _listdir(_SHM) if p.name.startswith(self.shm_prefix)]
        new_tmp = [p for p in _listdir(_TMP) if p not in self.tmp_before]
        folders = [p for p in new_tmp if p.name.startswith("folder") and self._mentions_workspace(p)]
        envs = [p for p in new_tmp if p.name.startswith("python_env_") and p.is_dir() and not any(p.iterdir())]
        return {"shm": shm, "folders": folders + envs, "processes": self._stubs()}

    def remove(self) -> dict[str, list]:
        found = self.find()
        for pid in found["processes"]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for path in found["shm"]:
            path.unlink(missing_ok=True)
        for path in found["folders"]:
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(self.workspace, ignore_errors=True)
        return found

    def _mentions_workspace(self, folder: Path) -> bool:
        for config in list(folder.glob("config.pbtxt")) + list(folder.glob("*/config.pbtxt")):
            with contextlib.suppress(OSError):
                if str(self.workspace) in config.read_text(errors="replace"):
                    return True
        return False

    def _stubs(self) -> list[int]:
        pids = []
        for proc in _listdir(Path("/proc")):
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                if cmd.startswith(str(self.workspace)) and cmd.endswith("triton_python_backend_stub"):
                    pids.append(int(proc.name))
        return pids


def _listdir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------
# The server


def check_port(port: int, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UserError(f"{what} must be a port number in 1..65535, got {port}")
    return port


def check_host(host: str) -> str:
    if not host or any(c.isspace() for c in host):
        raise UserError(f"`host` must be an address such as 127.0.0.1, got {host!r}")
    return host


@dataclass
class ServerConfig:
    host: str = DEFAULT_HOST
    http_port: int = DEFAULT_HTTP_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    metrics_port: Optional[int] = DEFAULT_METRICS_PORT   # None: no metrics endpoint
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    drain_s: int = DEFAULT_DRAIN_S
    instances: int = 1
    triton_log: Optional[Path] = None                     # keep Triton's own log there
    # first on the Python path of the backend stub alone (default: $MAME_SERVE_STUB_PYTHONPATH)
    stub_pythonpath: tuple = field(default_factory=env_stub_pythonpath)

    def check(self) -> "ServerConfig":
        check_host(self.host)
        ports = [check_port(self.http_port, "`http_port`"), check_port(self.grpc_port, "`grpc_port`")]
        if self.metrics_port is not None:
            ports.append(check_port(self.metrics_port, "`metrics_port`"))
        if len(set(ports)) != len(ports):
            raise UserError(f"the HTTP, gRPC and metrics ports must differ, got {ports}")
        if not 0 <= self.queue_delay_us <= 10_000_000:
            raise UserError(f"`max_queue_delay_us` must be in 0..10000000, got {self.queue_delay_us}")
        if not 1 <= self.drain_s <= MAX_DRAIN_S:
            raise UserError(f"`drain_timeout` must be in 1..{MAX_DRAIN_S} s (PyTriton stops waiting "
                            f"for Triton after 30 s), got {self.drain_s}")
        if not 1 <= self.instances <= 64:
            raise UserError(f"`instances` must be in 1..64, got {self.instances}")
        self.stub_pythonpath = check_stub_pythonpath(self.stub_pythonpath)
        return self

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{_url_host(self.host)}:{self.grpc_port}"


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class Server:
    """Triton with ``models`` bound, started by :meth:`start` and stopped by :meth:`stop`.

    ``with Server(models, config) as server:`` starts and stops it; :func:`serve` adds the
    signal handling of the ``serve`` command.
    """

    def __init__(self, models: Sequence[ServedModel], config: Optional[ServerConfig] = None):
        if not models:
            raise UserError("nothing to serve: pass an .onnx, a .plan or a model name")
        check_unique_names(models)
        self.models = list(models)
        self.config = (config or ServerConfig()).check()
        self.triton = None
        self.runners: list = []
        self.leftovers: Optional[Leftovers] = None
        self.cleaned: dict = {}
        self._scratch: Optional[tempfile.TemporaryDirectory] = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> "Server":
        pytriton = require_pytriton(self.config.stub_pythonpath)
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import TritonSecurityConfig

        fix_library_path()
        missing = stub_libpython_missing()
        if missing:
            raise UserError(explain_missing_libpython(missing))
        logging.getLogger("pytriton").setLevel(logging.ERROR)  # its INFO lines are not for users
        self._scratch = tempfile.TemporaryDirectory(prefix="mame-deploy-serve-")
        workspace = Path(self._scratch.name) / "workspace"
        self.leftovers = Leftovers.before_start(workspace)
        c = self.config
        log_file = c.triton_log or Path(self._scratch.name) / "tritonserver.log"
        triton_config = pytriton.TritonConfig(
            http_address=c.host, http_port=c.http_port, grpc_address=c.host, grpc_port=c.grpc_port,
            allow_metrics=c.metrics_port is not None, metrics_port=c.metrics_port,
            # GPU metrics start DCGM, which prints an NVML error on machines without a GPU.
            allow_gpu_metrics=c.metrics_port is not None and any(m.device == "cuda" for m in self.models),
            metrics_address=c.host if c.metrics_port is not None else None,
            allow_sagemaker=False, allow_vertex_ai=False, exit_timeout_secs=c.drain_s,
            log_file=Path(log_file), log_verbose=0,
        )
        self.triton = pytriton.Triton(
            config=triton_config, workspace=workspace,
            security_config=TritonSecurityConfig(restricted_endpoints=list(RESTRICTED_ENDPOINTS)),
        )
        try:
            for model in self.models:
                callables = [self._callable(model) for _ in range(c.instances)]
                self.triton.bind(
                    model_name=model.name, model_version=model.version, infer_func=callables,
                    inputs=[Tensor(name=INPUT_NAME, dtype=np.float32, shape=tuple(model.input_shape))],
                    outputs=[Tensor(name=OUTPUT_NAME, dtype=np.float32, shape=(model.num_classes,))],
                    config=ModelConfig(
                        max_batch_size=model.max_batch,
                        batcher=DynamicBatcher(
                            max_queue_delay_microseconds=c.queue_delay_us,
                            preferred_batch_size=[model.fixed_batch] if model.fixed_batch else None,
                        ),
                    ),
                )
            self._add_parameters()
            with stub_environment(c.stub_pythonpath):
                self.triton.run()  # starts tritonserver and loads every bound model
        except BaseException as exc:
            detail = self._server_log_tail()
            self.stop()
            if isinstance(exc, (KeyboardInterrupt, UserError)):
                raise
            raise UserError(f"Triton did not start serving: {explain_load_failure(str(exc) + detail)}") from None
        return self

    def _callable(self, model: ServedModel) -> BatchInference:
        runner = model.make_runner()
        runner.activate()
        self.runners.append(runner)
        for batch in model.warmup_batches():  # first calls build sessions / capture graphs
            runner.infer({INPUT_NAME: np.zeros((batch, *model.input_shape), np.float32)}, check_inputs=False)
        return BatchInference(model, runner)

    def _add_parameters(self) -> None:
        """The manifest as config parameters. PyTriton's ModelConfig has no field for them, so
        they go into the Triton model config it builds, before the models are loaded."""
        by_name = {m.name: m for m in self.models}
        try:
            bound = list(self.triton._model_manager.models)
            for model in bound:
                model._get_triton_model_config().backend_parameters.update(by_name[model.model_name].parameters())
        except AttributeError as exc:  # a PyTriton other than the 0.7 line this was written for
            raise UserError(f"this PyTriton cannot take model parameters ({exc}); {SERVE_HINT}") from None

    def _server_log_tail(self) -> str:
        server = getattr(self.triton, "_triton_server", None)
        path = self.config.triton_log or (Path(self._scratch.name) / "tritonserver.log" if self._scratch else None)
        text = ""
        with contextlib.suppress(Exception):
            text = server.logs() if server is not None else ""
        with contextlib.suppress(OSError, TypeError):
            text += Path(path).read_text(errors="replace")[-4000:]
        return "\n" + text if text else ""

    def stop(self) -> dict:
        """Stop Triton (it drains what is in flight), release the runners, remove leftovers."""
        if self.triton is not None:
            with contextlib.suppress(Exception):
                self.triton.stop()
            self.triton = None
        for runner in self.runners:
            with contextlib.suppress(Exception):
                runner.deactivate()
        self.runners.clear()
        if self.leftovers is not None:
            self.cleaned = {k: v for k, v in self.leftovers.remove().items() if v}
            self.leftovers = None
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
        return self.cleaned

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def is_alive(self) -> bool:
        return self.triton is not None and self.triton.is_alive()


def serve(models: Sequence[ServedModel], config: Optional[ServerConfig] = None,
          on_ready: Optional[Callable[[Server], None]] = None, poll_s: float = 0.5) -> str:
    """Serve ``models`` until Ctrl-C or SIGTERM (or until Triton dies), then drain and stop.

    The signal handlers are in place before Triton starts, so a signal during start-up also
    ends in a clean stop; signals during the drain are ignored. Returns why serving ended:
    ``SIGINT``, ``SIGTERM`` or ``triton-exited``.
    """
    with stop_signals() as signalled:
        server = Server(models, config)
        try:
            server.start()
            if on_ready is not None:
                on_ready(server)
            while server.is_alive() and not signalled:
                time.sleep(poll_s)
        except KeyboardInterrupt:
            pass
        finally:
            with ignore_signals():
                server.stop()
    return signalled[0] if signalled else "triton-exited"


@contextlib.contextmanager
def stop_signals():
    """SIGTERM and SIGINT raise KeyboardInterrupt once (PyTriton itself handles only SIGINT);
    the list yielded holds the name of the signal that came."""
    received: list[str] = []

    def handler(signum, frame):
        if not received:
            received.append(signal.Signals(signum).name)
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def ignore_signals():
    """While draining: a second Ctrl-C or SIGTERM must not cut the clean-up short."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
