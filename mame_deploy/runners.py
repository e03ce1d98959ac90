"""Runners: one interface -- polygraphy's ``BaseRunner`` -- over every backend that executes a
model: ``with runner: outputs = runner.infer({"images": array})`` and
``runner.last_inference_time()``. onnxruntime uses polygraphy's own ``OnnxrtRunner``; PyTorch
gets ``TorchRunner`` (polygraphy's PytRunner always moves inputs to CUDA and does not
synchronise) and ``TorchGraphRunner`` (CUDA-graph replay); TensorRT engines use
``mame_deploy.trt_runner.TrtRunner``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import onnx
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata

from mame_deploy.decisions import TRACED, trace_name
from mame_deploy import manifest as manifests
from mame_deploy import source as sources
from mame_deploy.artifacts import read_onnx, sha256_bytes
from mame_deploy.engine import read_engine_manifest
from mame_deploy.errors import UserError
from mame_deploy.manifest import INPUT_NAME, OUTPUT_NAME, Source

DEVICES = ("cpu", "cuda")


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise UserError(f"`device` must be one of {', '.join(DEVICES)}, got {device!r}")
    return device


def check_threads(threads: Optional[int]) -> Optional[int]:
    """CPU thread counts are positive; None leaves the runtime's default."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UserError(f"`threads` must be at least 1 (or left out for the runtime's default), got {threads}")
    return threads


# ---------------------------------------------------------------------------------------------
# onnxruntime


def onnxruntime_session(model: Union[str, Path, bytes], device: str = "cpu", threads: Optional[int] = None):
    """An InferenceSession on ``device`` (CUDA needs onnxruntime-gpu), ``threads`` intra-op threads."""
    import onnxruntime as ort

    check_device(device)
    check_threads(threads)
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError("this onnxruntime has no CUDA execution provider; install onnxruntime-gpu "
                            "or use `device` cpu")
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: initializer-cleanup notes are not for users
    if threads:
        options.intra_op_num_threads = threads
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=providers)


class ReferenceRunner(BaseRunner):
    """``onnx.reference`` (ONNX's Python reference evaluator) as a polygraphy runner: what runs a
    bf16 file on the CPU, which onnxruntime's CPU provider cannot (``Artifact.onnxruntime_lacks_dtype``).
    A Python interpreter of the graph: for parity, not for timing."""

    def __init__(self, data: bytes, name: Optional[str] = None):
        super().__init__(name=name, prefix="onnx-reference-runner")
        self.data = data

    def activate_impl(self):
        from onnx.reference import ReferenceEvaluator

        self.proto = onnx.load_from_string(self.data)
        self.evaluator = ReferenceEvaluator(self.proto)

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for value in self.proto.graph.input:
            dims = value.type.tensor_type.shape.dim
            meta.add(value.name, dtype=np.float32, shape=tuple(d.dim_value or None for d in dims))
        return meta

    def infer_impl(self, feed_dict):
        begin = time.perf_counter()
        values = self.evaluator.run(None, dict(feed_dict))
        self.inference_time = time.perf_counter() - begin
        return OrderedDict((out.name, np.asarray(v)) for out, v in zip(self.proto.graph.output, values))

    def deactivate_impl(self):
        del self.evaluator, self.proto


# ---------------------------------------------------------------------------------------------
# PyTorch


class TorchRunner(BaseRunner):
    """A PyTorch image classifier as a polygraphy runner: numpy images in, numpy logits out.

    On CUDA the time of ``infer`` is measured with CUDA events around the forward pass, so it
    counts the GPU's work and not only the launches. ``compile_mode``: run
    ``torch.compile(model, mode=compile_mode)`` instead (compiled on the first call).
    """

    def __init__(self, model: torch.nn.Module, device: str = "cpu", threads: Optional[int] = None,
                 name: Optional[str] = None, trace_merges: bool = False, compile_mode: Optional[str] = None):
        super().__init__(name=name or f"torch:{getattr(model, 'model_name', type(model).__name__)}",
                         prefix="torch-runner")
        self.model = model
        self.forward = model
        self.compile_mode = compile_mode
        self.trace_merges = trace_merges  # also output each merge step's decisions (decisions.py)
        self.device = torch.device(check_device(device))
        self.threads = check_threads(threads)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("PyTorch sees no CUDA device here; use `device` cpu")

    def activate_impl(self):
        if self.threads:
            torch.set_num_threads(self.threads)
        self.model = self.model.to(self.device).eval()
        self.forward = torch.compile(self.model, mode=self.compile_mode) if self.compile_mode else self.model

    def get_input_metadata_impl(self):
        cfg = self.model.config
        meta = TensorMetadata()
        meta.add(INPUT_NAME, dtype=np.float32, shape=(None, cfg.in_chans, cfg.img_size, cfg.img_size))
        return meta

    def infer_impl(self, feed_dict):
        merge = getattr(self.model, "token_merge", None) if self.trace_merges else None
        if merge is None:
            return self._forward(feed_dict)
        merge.trace = {}
        try:
            outputs = self._forward(feed_dict)
            for layer, traced in merge.trace.items():
                for output, value in zip(TRACED, traced):
                    outputs[trace_name(layer, output)] = value.cpu().numpy()
        finally:
            merge.trace = None
        return outputs

    def _forward(self, feed_dict):
        images = torch.from_numpy(np.ascontiguousarray(feed_dict[INPUT_NAME])).to(self.device)
        with torch.inference_mode():
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                logits = self.forward(images)
                end.record()
                end.synchronize()
                self.inference_time = start.elapsed_time(end) / 1e3
            else:
                begin = time.perf_counter()
                logits = self.forward(images)
                self.inference_time = time.perf_counter() - begin
        return OrderedDict([(OUTPUT_NAME, logits.float().cpu().numpy())])

    def deactivate_impl(self):
        self.model = self.forward = self.model.cpu()


def capture_cuda_graph(fn: Callable[[], Any]) -> tuple["torch.cuda.CUDAGraph", Any]:
    """One call of ``fn`` captured as a CUDA graph, after three warm-up calls on a side stream
    (as capture requires); returns the graph and the captured call's output, which each replay
    rewrites. The caller chooses the grad mode."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class TorchGraphRunner(TorchRunner):
    """PyTorch on CUDA replaying one captured CUDA graph per input shape (launch overhead gone,
    as in an engine); the replay is timed with CUDA events."""

    def __init__(self, model: torch.nn.Module, name: Optional[str] = None):
        super().__init__(model, "cuda", name=name or f"torch-graph:{getattr(model, 'model_name', type(model).__name__)}")
        self.graphs = {}

    def _graph(self, shape):
        if shape not in self.graphs:
            static_in = torch.zeros(shape, device=self.device)
            with torch.inference_mode():
                graph, static_out = capture_cuda_graph(lambda: self.model(static_in))
            self.graphs[shape] = (graph, static_in, static_out)
        return self.graphs[shape]

    def infer_impl(self, feed_dict):
        images = np.ascontiguousarray(feed_dict[INPUT_NAME])
        graph, static_in, static_out = self._graph(tuple(images.shape))
        static_in.copy_(torch.from_numpy(images))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        self.inference_time = start.elapsed_time(end) / 1e3
        return OrderedDict([(OUTPUT_NAME, static_out.float().cpu().numpy())])

    def deactivate_impl(self):
        self.graphs.clear()
        super().deactivate_impl()


# ---------------------------------------------------------------------------------------------
# Artifacts: what validate and bench check, whichever runtime runs it


ENGINE_SUFFIX = ".plan"


@dataclass(frozen=True)
class Artifact:
    """One exported file to check -- an ONNX file (onnxruntime) or a TensorRT engine -- with its
    manifest read, and an ONNX file parsed, once. validate and bench treat both alike; what
    differs is here: which runner runs it, on which device, at which batch sizes, in which
    precision."""

    path: Path
    runtime: str                 # "onnxruntime" or "tensorrt"
    record: dict                 # the manifest
    device: str
    threads: Optional[int] = None
    proto: Optional[onnx.ModelProto] = None   # ONNX files: the graph
    data: Optional[bytes] = None               # ONNX files: the file's bytes (what onnxruntime loads)

    @property
    def source(self) -> Source:
        return manifests.source_from_manifest(self.record)

    @property
    def engine(self) -> Optional[dict]:
        """The manifest's engine record (engines only)."""
        return self.record.get("engine") if self.runtime == "tensorrt" else None

    @property
    def precision(self) -> str:
        """An engine's build precision, or the float type an ONNX file runs in (its manifest's
        ``dtype``; files exported before the field are fp32)."""
        return self.engine["precision"] if self.engine else self.record.get("dtype", "fp32")

    @property
    def fixed_batch(self) -> Optional[int]:
        """The only batch size a static file or engine runs (None: several)."""
        batch = self.engine["batch"] if self.engine else self.record["batch"]
        return batch if isinstance(batch, int) else None

    def batch_for(self, requested: Optional[int], samples: int) -> int:
        """The batch to run ``samples`` images in: the static batch, else ``requested`` (checked
        against an engine's optimisation profile), else a default."""
        fixed, built = self.fixed_batch, "engine was built" if self.engine else "file was exported"
        if fixed is not None:
            if requested is not None and requested != fixed:
                raise UserError(f"the {built} for batch {fixed}, not {requested}; drop `batch` or "
                                f"re-export with `batch` {requested} (or `dynamic_batch`)")
            return fixed
        if requested is not None and requested < 1:
            raise UserError(f"`batch` must be at least 1, got {requested}")
        if self.engine:
            low, opt, high = (self.engine["batch"][k] for k in ("min", "opt", "max"))
            if requested is None:
                return max(low, min(samples, opt))
            if not low <= requested <= high:
                raise UserError(f"`batch` {requested} is outside the engine's profile ({low}..{high})")
            return requested
        return requested or min(samples, 8)

    @property
    def onnxruntime_lacks_dtype(self) -> bool:
        """A bf16 ONNX file on the CPU: onnxruntime's CPU provider has no bfloat16 kernels."""
        return self.runtime == "onnxruntime" and self.device == "cpu" and self.precision == "bf16"

    def runner(self, proto: Optional[onnx.ModelProto] = None, reference: bool = False) -> BaseRunner:
        """A polygraphy runner for the file (``proto``: run this graph instead, e.g. the file
        with decision outputs added). ``reference``: where onnxruntime cannot run the file
        (``onnxruntime_lacks_dtype``), run it in onnx.reference instead of refusing."""
        name = f"{self.runtime}:{self.path.name}"
        if self.runtime == "tensorrt":
            from mame_deploy.trt_runner import TrtRunner  # polygraphy's TensorRT backend: only when used

            return TrtRunner(self.path, name=name)
        data = self.data if proto is None else proto.SerializeToString()
        if self.onnxruntime_lacks_dtype:
            if reference:
                return ReferenceRunner(data, name=f"onnx.reference:{self.path.name}")
            raise UserError(f"{self.path} runs in bf16, which onnxruntime's CPU provider cannot run (it has no "
                            "bfloat16 kernels: Conv(22) is the first it lacks); build a TensorRT engine from it "
                            "(`mame-deploy build`), or export in fp16 or fp32 for onnxruntime (mame-deploy validate checks "
                            "a bf16 file with onnx.reference)")
        return OnnxrtRunner(lambda: onnxruntime_session(data, self.device, self.threads), name=name)


def open_artifact(path: Union[str, Path], device: str = "cpu", threads: Optional[int] = None) -> Artifact:
    """Read ``path`` -- NAME.onnx or NAME.plan -- and its manifest, checked to belong together
    (the file is read and hashed once). An engine runs on the GPU whatever ``device`` says."""
    path = Path(path)
    check_threads(threads)
    if path.suffix == ENGINE_SUFFIX:  # TensorRT is needed to run it, not to read it (see Artifact.runner)
        return Artifact(path, "tensorrt", read_engine_manifest(path), "cuda", None)
    device = check_device(device)
    proto, data = read_onnx(path)
    record = sources.read_manifest(path, sha256_bytes(data))
    manifests.check_onnx_input(proto, record, path)
    return Artifact(path, "onnxruntime", record, device, threads, proto, data)
