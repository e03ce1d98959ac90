"""The manifest: NAME.json beside NAME.onnx (and NAME.plan).

It records what the artifact was made from -- model, checkpoint and its sha256, seed, config
overrides, merge method/options/schedule -- so that ``validate`` and ``bench`` rebuild exactly
the PyTorch source the file came from, and what the file is (input shape, batch, opset, scan
mode, the ONNX file's own sha256, tool versions). ``Source`` is the rebuildable part.
"""

from __future__ import annotations

import json
import math
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
        if Path(checkpoint).is_dir():
            raise UserError(f"checkpoint {checkpoint} (from the manifest) is now a directory; "
                            "put the weights file back at that path or re-export the model")
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


def model_config(source: Source):
    """The model config ``source`` describes (its overrides checked), without building it."""
    from mame_deploy.models import model_config as config_of

    return config_of(source.model, **source.overrides)


def model_schedule(model: nn.Module) -> list[int]:
    """Tokens removed after each block (all zeros for an unpatched model)."""
    schedule = getattr(model, "mame_schedule", None)
    return [int(r) for r in schedule] if schedule is not None else [0] * model.config.depth


def tokens_per_layer(model: nn.Module) -> list[int]:
    """Sequence length each block sees, class token included."""
    return [int(t) for t in schedule_tokens(model.config, model_schedule(model))]


# ---------------------------------------------------------------------------------------------
# Reading


def _is_int(value, low: Optional[int] = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _int_list(low: int):
    return lambda v: isinstance(v, list) and all(_is_int(x, low) for x in v)


def _field_rules() -> dict:
    """field -> (test, what the field must be). Optional fields are checked when present."""
    from mame_deploy.merge import METHODS
    from mame_deploy.models import list_models
    from mame_deploy.onnx_export import OPSETS, SCAN_MODES
    from mame_deploy.schedule import MAX_RATIO

    return {
        "model": (lambda v: v in list_models(), f"one of {', '.join(list_models())}"),
        "checkpoint": (lambda v: v is None or isinstance(v, str), "a path or null"),
        "checkpoint_sha256": (lambda v: v is None or _is_sha256(v), "a sha256 (64 hex digits) or null"),
        "seed": (_is_int, "an integer"),
        "method": (lambda v: v in METHODS, f"one of {', '.join(METHODS)}"),
        "ratio": (lambda v: _is_number(v) and 0 <= v <= MAX_RATIO, f"a number in [0, {MAX_RATIO}]"),
        "schedule": (_int_list(0), "a list of token counts (integers >= 0)"),
        "tokens_per_layer": (_int_list(1), "a list of token counts (integers >= 1)"),
        "input_shape": (lambda v: isinstance(v, list) and len(v) == 4
                        and (_is_int(v[0], 1) or isinstance(v[0], str)) and all(_is_int(x, 1) for x in v[1:]),
                        "[batch, channels, height, width] with positive sizes"),
        "batch": (lambda v: v is None or _is_int(v, 1), "a positive integer, or null for a dynamic batch"),
        "opset": (lambda v: v in OPSETS, f"an opset in {OPSETS.start}..{OPSETS.stop - 1}"),
        "scan": (lambda v: v in SCAN_MODES, f"one of {', '.join(SCAN_MODES)}"),
        "onnx_sha256": (_is_sha256, "a sha256 (64 hex digits)"),
        "versions": (lambda v: isinstance(v, dict), "an object"),
        # optional
        "overrides": (lambda v: v is None or isinstance(v, dict), "an object of config fields"),
        "options": (lambda v: v is None or isinstance(v, dict), "an object of merge options"),
        "schedule_spec": (lambda v: v is None or isinstance(v, str), "a layer:count text or null"),
        "relative_gflops": (lambda v: _is_number(v) and v > 0, "a positive number"),
        "input_name": (lambda v: isinstance(v, str) and v != "", "a tensor name"),
    }


def check_fields(data: dict, path: Union[str, Path]) -> None:
    """Each field of the manifest ``data`` has the type and range it must have, and the fields
    agree with each other and with the model they name; else one line naming the field."""
    def bad(message: str) -> UserError:
        return UserError(f"manifest {path}: {message}; fix it or re-export the model")

    for key, (test, what) in _field_rules().items():
        if key in data and not test(data[key]):
            raise bad(f"field {key!r} must be {what}, got {json.dumps(data[key])[:80]}")
    from mame_deploy.models import model_config

    try:
        config = model_config(data["model"], **(data.get("overrides") or {}))
    except UserError as exc:
        raise bad(f"field 'overrides' does not describe a {data['model']}: {exc}") from None
    shape, batch = data["input_shape"], data["batch"]
    if (batch is None) != isinstance(shape[0], str) or (batch is not None and shape[0] != batch):
        raise bad(f"input_shape {shape} disagrees with batch {json.dumps(batch)}")
    image = [config.in_chans, config.img_size, config.img_size]
    if shape[1:] != image:
        raise bad(f"input_shape {shape} does not fit {data['model']}, which takes "
                  f"{'x'.join(map(str, image))} images")
    for key in ("schedule", "tokens_per_layer"):
        if len(data[key]) != config.depth:
            raise bad(f"field {key!r} has {len(data[key])} entries, {data['model']} has {config.depth} blocks")
    if data["tokens_per_layer"] != schedule_tokens(config, data["schedule"]):
        raise bad("tokens_per_layer does not follow from schedule")


def read_manifest(artifact: Union[str, Path], sha256: Optional[str] = None) -> dict:
    """The manifest beside ``artifact``, checked field by field (``check_fields``) and, when
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
    check_fields(data, path)
    if sha256 is not None and data["onnx_sha256"] != sha256:
        raise UserError(f"manifest {path} does not match {artifact} (its onnx_sha256 differs): the file was "
                        "re-exported or replaced; export again to get a matching pair")
    return data


def check_onnx_input(proto, data: dict, onnx_path: Union[str, Path]) -> None:
    """The ONNX graph's image input has the shape its manifest records, so a file paired with
    another model's manifest is refused here rather than by the runtime mid-run."""
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in initializers]
    expected = data["input_shape"]
    if len(inputs) != 1:
        raise UserError(f"{onnx_path} has {len(inputs)} inputs; a `mame-deploy export` file has one (images)")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    if len(shape) == 4:  # a static batch equals the manifest's; a symbolic one is a name
        same_batch = shape[0] == expected[0] if isinstance(expected[0], int) else isinstance(shape[0], str)
    if len(shape) != 4 or not same_batch or shape[1:] != expected[1:]:
        raise UserError(f"{onnx_path} takes input {inputs[0].name} of shape {tuple(shape)} but its manifest "
                        f"{manifest_path(onnx_path)} describes {data['model']} with input {tuple(expected)}; "
                        "the two files do not belong together: re-export the model")


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
