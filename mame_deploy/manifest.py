"""The manifest: NAME.json beside NAME.onnx (and NAME.plan).

It records what the artifact was made from -- model, checkpoint and its sha256, seed, config
overrides, merge method/options/schedule -- so that ``validate`` and ``bench`` rebuild exactly
the PyTorch source the file came from, and what the file is (input shape, batch, opset, scan
mode, the ONNX file's own sha256, tool versions). ``Source`` is the rebuildable part.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Optional, Union

import torch.nn as nn

from mame_deploy.artifacts import file_sha256
from mame_deploy.errors import UserError
from mame_deploy.patch import patch
from mame_deploy.schedule import tokens_per_layer as schedule_tokens

MANIFEST_VERSION = 1
REQUIRED_KEYS = (
    "model", "checkpoint", "checkpoint_sha256", "seed", "method", "ratio", "schedule",
    "tokens_per_layer", "input_shape", "batch", "opset", "scan", "onnx_sha256", "versions",
)
_TOOLS = ("mame-deploy", "torch", "onnx", "onnxruntime", "onnxscript", "polygraphy", "numpy")


def manifest_path(artifact: Union[str, Path]) -> Path:
    """The manifest of ``NAME.onnx`` / ``NAME.plan`` is ``NAME.json`` beside it."""
    return Path(artifact).with_suffix(".json")


def tool_versions() -> dict[str, Optional[str]]:
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# ---------------------------------------------------------------------------------------------
# The PyTorch source of an artifact


@dataclass(frozen=True)
class Source:
    """Everything needed to rebuild the (patched) PyTorch model an artifact was exported from."""

    model: str
    checkpoint: Optional[str] = None          # absolute path, or None for seeded random weights
    checkpoint_sha256: Optional[str] = None
    seed: int = 0
    overrides: dict = field(default_factory=dict)   # config fields changed from the registry's
    method: str = "mame"
    ratio: float = 0.0
    schedule_spec: Optional[str] = None       # the user's --schedule text, if any
    options: dict = field(default_factory=dict)     # merge options (ablation switches)

    def as_dict(self) -> dict:
        return asdict(self)


def build_model(source: Source, expected_schedule: Optional[list[int]] = None) -> nn.Module:
    """Create, load and patch the model ``source`` describes (eval mode, on the CPU).

    ``expected_schedule`` (from a manifest) guards against a rebuild that merges differently
    from the export, e.g. after the default merge placement changed.
    """
    from mame_deploy.models import create_model

    checkpoint = source.checkpoint
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise UserError(f"checkpoint {checkpoint} (from the manifest) does not exist; "
                            "put it back at that path or re-export the model")
        if source.checkpoint_sha256 and file_sha256(checkpoint) != source.checkpoint_sha256:
            raise UserError(f"checkpoint {checkpoint} changed since the export (sha256 differs); "
                            "re-export the model from this checkpoint")
    model = create_model(source.model, checkpoint=checkpoint, seed=source.seed, **source.overrides)
    patch(model, ratio=source.ratio, schedule=source.schedule_spec, method=source.method, **source.options)
    schedule = model_schedule(model)
    if expected_schedule is not None and list(expected_schedule) != schedule:
        raise UserError(f"the manifest's merge schedule {expected_schedule} differs from the one this version "
                        f"builds ({schedule}); re-export the model with this version")
    return model


def model_schedule(model: nn.Module) -> list[int]:
    """Tokens removed after each block (all zeros for an unpatched model)."""
    schedule = getattr(model, "mame_schedule", None)
    return [int(r) for r in schedule] if schedule is not None else [0] * model.config.depth


def tokens_per_layer(model: nn.Module) -> list[int]:
    """Sequence length each block sees, class token included."""
    return [int(t) for t in schedule_tokens(model.config, model_schedule(model))]


# ---------------------------------------------------------------------------------------------
# Reading


def read_manifest(artifact: Union[str, Path], sha256: Optional[str] = None) -> dict:
    """The manifest beside ``artifact``, checked for the keys every command relies on and, when
    ``sha256`` (the artifact's own) is given, that it describes this very file."""
    path = manifest_path(artifact)
    if not path.is_file():
        raise UserError(f"no manifest {path} beside {artifact}; `mame-deploy export` writes it with the "
                        "ONNX file -- keep the two together or re-export")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path} is not a readable manifest ({exc}); re-export the model") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a manifest (expected a JSON object); re-export the model")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise UserError(f"manifest {path} lacks {', '.join(missing)}; re-export the model")
    if sha256 is not None and data["onnx_sha256"] != sha256:
        raise UserError(f"manifest {path} does not match {artifact} (its onnx_sha256 differs): the file was "
                        "re-exported or replaced; export again to get a matching pair")
    return data


def source_from_manifest(data: dict) -> Source:
    return Source(
        model=data["model"],
        checkpoint=data["checkpoint"],
        checkpoint_sha256=data["checkpoint_sha256"],
        seed=int(data["seed"]),
        overrides=dict(data.get("overrides") or {}),
        method=data["method"],
        ratio=float(data["ratio"]),
        schedule_spec=data.get("schedule_spec"),
        options=dict(data.get("options") or {}),
    )
