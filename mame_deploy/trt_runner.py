"""Run a TensorRT engine built by ``mame_deploy.engine``: polygraphy's TrtRunner over the .plan,
with the selective-scan plugin registered first."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Union

from polygraphy.backend.trt import EngineFromPath
from polygraphy.backend.trt import TrtRunner as _PolygraphyTrtRunner

from mame_deploy.plugins.trt_aot import require_tensorrt
from mame_deploy.manifest import manifest_path
from mame_deploy.errors import UserError


def plugin_implementation(plan: Path) -> str:
    """'aot' or 'jit': how the plan's scan nodes run, from its manifest (AOT when unrecorded)."""
    try:
        record = json.loads(manifest_path(plan).read_text()).get("engine", {})
    except (OSError, ValueError, AttributeError):
        return "aot"
    return record.get("plugin", {}).get("implementation", "aot")


class TrtRunner(_PolygraphyTrtRunner):
    """A polygraphy runner (``with runner: runner.infer({name: array})``) for one .plan file.

    An AOT engine carries the kernels' PTX and deserialises without the plugins being
    registered (it needs no Python at run time); an engine built with ``--jit`` calls back
    into Python, so its plugins must be registered with their JIT implementations first.
    Registering for an AOT engine too is harmless and keeps one code path.
    """

    def __new__(cls, plan: Union[str, Path], name: Optional[str] = None):
        # Checked before an instance exists: polygraphy's runner finaliser expects a complete one.
        require_tensorrt("running an engine")
        if not Path(plan).is_file():
            raise UserError(f"{plan} does not exist; build it with mame-deploy build")
        return super().__new__(cls)

    def __init__(self, plan: Union[str, Path], name: Optional[str] = None):
        plan = Path(plan)
        from mame_deploy import plugins

        plugins.register(jit=plugin_implementation(plan) == "jit")
        self.plan = plan
        super().__init__(EngineFromPath(str(plan)), name=name or f"tensorrt:{plan.name}")

    def infer_impl(self, feed_dict, copy_outputs_to_host=None, return_raw_buffers=None):
        """As polygraphy's, but timed like ``TorchRunner`` on CUDA: inputs are put on the GPU
        first and CUDA events on the engine's stream bracket the execution, so
        ``last_inference_time`` is GPU time without the host<->device copies."""
        import numpy as np
        import torch

        host = any(isinstance(v, np.ndarray) for v in feed_dict.values())
        feeds = OrderedDict(
            (k, torch.from_numpy(np.ascontiguousarray(v)).cuda() if isinstance(v, np.ndarray) else v)
            for k, v in feed_dict.items()
        )
        torch.cuda.current_stream().synchronize()
        stream = torch.cuda.ExternalStream(self.stream.ptr)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        outputs = super().infer_impl(feeds, copy_outputs_to_host=False)
        end.record(stream)
        end.synchronize()
        self.inference_time = start.elapsed_time(end) / 1e3
        # The engine's output buffers are reused by the next call: hand out copies.
        return OrderedDict((k, v.float().cpu().numpy() if host else v.clone()) for k, v in outputs.items())
