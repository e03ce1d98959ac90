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
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import onnx
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata

from mame_deploy.decisions import TRACED, trace_name
from mame_deploy.artifacts import load_onnx_file
from mame_deploy.errors import UserError
from mame_deploy.manifest import INPUT_NAME, OUTPUT_NAME

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


def onnxruntime_runner(path: Union[str, Path], device: str = "cpu", threads: Optional[int] = None,
                       name: Optional[str] = None) -> OnnxrtRunner:
    path = Path(path)
    load_onnx_file(path)  # a clear error for missing or foreign files before onnxruntime's own
    return OnnxrtRunner(lambda: onnxruntime_session(path, device, threads), name=name or f"onnxruntime:{path.name}")


# ---------------------------------------------------------------------------------------------
# PyTorch


class TorchRunner(BaseRunner):
    """A PyTorch image classifier as a polygraphy runner: numpy images in, numpy logits out.

    On CUDA the time of ``infer`` is measured with CUDA events around the forward pass, so it
    counts the GPU's work and not only the launches.
    """

    def __init__(self, model: torch.nn.Module, device: str = "cpu", threads: Optional[int] = None,
                 name: Optional[str] = None, trace_merges: bool = False):
        super().__init__(name=name or f"torch:{getattr(model, 'model_name', type(model).__name__)}",
                         prefix="torch-runner")
        self.model = model
        self.trace_merges = trace_merges  # also output each merge step's decisions (decisions.py)
        self.device = torch.device(check_device(device))
        self.threads = check_threads(threads)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("PyTorch sees no CUDA device here; use `device` cpu")

    def activate_impl(self):
        if self.threads:
            torch.set_num_threads(self.threads)
        self.model = self.model.to(self.device).eval()

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
                logits = self.model(images)
                end.record()
                end.synchronize()
                self.inference_time = start.elapsed_time(end) / 1e3
            else:
                begin = time.perf_counter()
                logits = self.model(images)
                self.inference_time = time.perf_counter() - begin
        return OrderedDict([(OUTPUT_NAME, logits.float().cpu().numpy())])

    def deactivate_impl(self):
        self.model = self.model.cpu()


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
