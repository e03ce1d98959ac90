"""The manifest: NAME.json beside NAME.onnx (and NAME.plan).

It records what the artifact was made from -- model, checkpoint and its sha256, seed, config
overrides, merge method/options/schedule -- so that ``validate`` and ``bench`` rebuild exactly
the PyTorch source the file came from, and what the file is (input shape, batch, opset, scan
mode, the ONNX file's own sha256, tool versions). ``Source`` is the rebuildable part;
``mame_deploy.source`` rebuilds it and checks that a manifest names what this version can build.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Optional, Union

from mame_deploy.errors import UserError

MANIFEST_VERSION = 1
REQUIRED_KEYS = (
    "model", "checkpoint", "checkpoint_sha256", "seed", "method", "ratio", "schedule",
    "tokens_per_layer", "input_shape", "batch", "opset", "scan", "onnx_sha256", "versions",
)
# Names of the exported graph's input and output, and how its scans are represented.
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
SCAN_MODES = ("plugin", "inline")
# Precisions of an export (`export --dtype`): the float type the model runs in inside the file.
DTYPES = ("fp32", "fp16", "bf16")
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
    """field -> (test, what the field must be): the types and ranges any manifest must have.
    Optional fields are checked when present. Whether the model, method and merge settings are
    ones this version can rebuild is ``mame_deploy.source.check_manifest``'s business."""
    return {
        "model": (lambda v: isinstance(v, str) and v != "", "a model name"),
        "checkpoint": (lambda v: v is None or isinstance(v, str), "a path or null"),
        "checkpoint_sha256": (lambda v: v is None or _is_sha256(v), "a sha256 (64 hex digits) or null"),
        "seed": (_is_int, "an integer"),
        "method": (lambda v: isinstance(v, str) and v != "", "a merge method name"),
        "ratio": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        "schedule": (_int_list(0), "a list of token counts (integers >= 0)"),
        "tokens_per_layer": (_int_list(1), "a list of token counts (integers >= 1)"),
        "input_shape": (lambda v: isinstance(v, list) and len(v) == 4
                        and (_is_int(v[0], 1) or isinstance(v[0], str)) and all(_is_int(x, 1) for x in v[1:]),
                        "[batch, channels, height, width] with positive sizes"),
        "batch": (lambda v: v is None or _is_int(v, 1), "a positive integer, or null for a dynamic batch"),
        "opset": (lambda v: _is_int(v, 1), "an opset number"),
        "scan": (lambda v: v in SCAN_MODES, f"one of {', '.join(SCAN_MODES)}"),
        "onnx_sha256": (_is_sha256, "a sha256 (64 hex digits)"),
        "versions": (lambda v: isinstance(v, dict), "an object"),
        # optional
        "overrides": (lambda v: v is None or isinstance(v, dict), "an object of config fields"),
        "options": (lambda v: v is None or isinstance(v, dict), "an object of merge options"),
        "schedule_spec": (lambda v: v is None or isinstance(v, str), "a layer:count text or null"),
        "relative_gflops": (lambda v: _is_number(v) and v > 0, "a positive number"),
        "input_name": (lambda v: isinstance(v, str) and v != "", "a tensor name"),
        "dtype": (lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    }


def manifest_error(path: Union[str, Path], message: str) -> UserError:
    """One line about a bad field of the manifest at ``path``, with the fix."""
    return UserError(f"manifest {path}: {message}; fix it or re-export the model")


def check_fields(data: dict, path: Union[str, Path]) -> None:
    """Each field of the manifest ``data`` has the type and range it must have; else one line
    naming the field."""
    for key, (test, what) in _field_rules().items():
        if key in data and not test(data[key]):
            raise manifest_error(path, f"field {key!r} must be {what}, got {json.dumps(data[key])[:80]}")
    shape, batch = data["input_shape"], data["batch"]
    if (batch is None) != isinstance(shape[0], str) or (batch is not None and shape[0] != batch):
        raise manifest_error(path, f"input_shape {shape} disagrees with batch {json.dumps(batch)}")


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
