"""Run a TensorRT engine built by ``mame_deploy.engine``: polygraphy's TrtRunner over the .plan,
with the selective-scan plugin registered first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from polygraphy.backend.trt import EngineFromPath
from polygraphy.backend.trt import TrtRunner as _PolygraphyTrtRunner

from mame_deploy.engine import require_tensorrt
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

    An AOT engine carries the kernel's PTX and needs no Python at run time; the plugin is
    registered anyway (and with its JIT implementation for ``--jit`` engines) because
    TensorRT looks the plugin up by name while deserialising.
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
