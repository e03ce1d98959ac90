"""The PyTorch source of an artifact: the (patched) model a manifest's ``Source`` describes.

``build_model`` rebuilds it -- the checkpoint checked against its recorded sha256, the merge
schedule against the one recorded -- so validate, bench, serve and tune compare an artifact with
exactly the model it was exported from. ``read_manifest`` reads a manifest (``mame_deploy.manifest``)
and checks that it names a model, merge method and settings this version can rebuild.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from mame_deploy import artifacts
from mame_deploy import manifest as manifests
from mame_deploy.errors import UserError
from mame_deploy.manifest import DTYPES, Source
from mame_deploy.merge import METHODS
from mame_deploy.models import create_model, get_spec, list_models
from mame_deploy.models import model_config as config_of
from mame_deploy.models.checkpoint import check_checkpoint_path
from mame_deploy.ops.onnx_functions import OPSETS
from mame_deploy.patch import patch
from mame_deploy.schedule import MAX_RATIO
from mame_deploy.schedule import tokens_per_layer as schedule_tokens


TORCH_DTYPES = dict(zip(DTYPES, (torch.float32, torch.float16, torch.bfloat16)))


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}")


def in_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """``model`` (in place) running in ``dtype`` (fp32 / fp16 / bf16), with what the design keeps
    float32 kept so (``VisionMamba.to_dtype``); it still takes and returns float32."""
    check_dtype(dtype)
    return model if dtype == "fp32" else model.to_dtype(TORCH_DTYPES[dtype])


def build_model(source: Source, expected_schedule: Optional[list[int]] = None, dtype: str = "fp32") -> nn.Module:
    """Create, load and patch the model ``source`` describes (eval mode, on the CPU), in ``dtype``.

    ``expected_schedule`` (from a manifest) guards against a rebuild that merges differently
    from the export, e.g. after the default merge placement changed.
    """
    checkpoint = source.checkpoint
    if checkpoint is not None:
        if Path(checkpoint).is_dir():
            raise UserError(f"checkpoint {checkpoint} (from the manifest) is now a directory; "
                            "put the weights file back at that path or re-export the model")
        if not Path(checkpoint).is_file():
            raise UserError(f"checkpoint {checkpoint} (from the manifest) does not exist; "
                            "put it back at that path or re-export the model")
        if source.checkpoint_sha256 and artifacts.file_sha256(checkpoint) != source.checkpoint_sha256:
            raise UserError(f"checkpoint {checkpoint} changed since the export (sha256 differs); "
                            "re-export the model from this checkpoint")
    model = create_model(source.model, checkpoint=checkpoint, seed=source.seed, **source.overrides)
    patch(model, ratio=source.ratio, schedule=source.schedule_spec, method=source.method, **source.options)
    schedule = model_schedule(model)
    if expected_schedule is not None and list(expected_schedule) != schedule:
        raise UserError(f"the manifest's merge schedule {expected_schedule} differs from the one this version "
                        f"builds ({schedule}); re-export the model with this version")
    return in_dtype(model, dtype)


def model_config(source: Source):
    """The model config ``source`` describes (its overrides checked), without building it."""
    return config_of(source.model, **source.overrides)


def model_schedule(model: nn.Module) -> list[int]:
    """Tokens removed after each block (all zeros for an unpatched model)."""
    schedule = getattr(model, "mame_schedule", None)
    return [int(r) for r in schedule] if schedule is not None else [0] * model.config.depth


def tokens_per_layer(model: nn.Module) -> list[int]:
    """Sequence length each block sees, class token included."""
    return [int(t) for t in schedule_tokens(model.config, model_schedule(model))]


def resolve_checkpoint(source: Source) -> Source:
    """Pin the checkpoint: the file actually loaded (the model's bundled weights when none is
    given), by absolute path and sha256, so later commands load the same bytes. A source already
    pinned is returned as it is (the file is hashed once per command)."""
    checkpoint = source.checkpoint or get_spec(source.model).bundled_checkpoint
    if checkpoint is None:
        return replace(source, checkpoint=None, checkpoint_sha256=None)
    if source.checkpoint_sha256 is not None and Path(checkpoint).is_absolute():
        return source
    path = check_checkpoint_path(checkpoint)
    return replace(source, checkpoint=str(path.resolve()), checkpoint_sha256=artifacts.file_sha256(path))


# ---------------------------------------------------------------------------------------------
# Manifests this version can rebuild


def check_manifest(data: dict, path: Union[str, Path]) -> None:
    """The manifest names a model, method, ratio and opset this version knows, and its shapes and
    schedule agree with that model; else one line naming the field."""
    vocabulary = {
        "model": (data["model"] in list_models(), f"one of {', '.join(list_models())}"),
        "method": (data["method"] in METHODS, f"one of {', '.join(METHODS)}"),
        "ratio": (data["ratio"] <= MAX_RATIO, f"a number in [0, {MAX_RATIO}]"),
        "opset": (data["opset"] in OPSETS, f"an opset in {OPSETS.start}..{OPSETS.stop - 1}"),
    }
    for key, (ok, what) in vocabulary.items():
        if not ok:
            raise manifests.manifest_error(path, f"field {key!r} must be {what}, got {json.dumps(data[key])[:80]}")
    try:
        config = config_of(data["model"], **(data.get("overrides") or {}))
    except UserError as exc:
        raise manifests.manifest_error(path, f"field 'overrides' does not describe a {data['model']}: {exc}") from None
    shape = data["input_shape"]
    image = [config.in_chans, config.img_size, config.img_size]
    if shape[1:] != image:
        raise manifests.manifest_error(path, f"input_shape {shape} does not fit {data['model']}, which takes "
                                             f"{'x'.join(map(str, image))} images")
    for key in ("schedule", "tokens_per_layer"):
        if len(data[key]) != config.depth:
            raise manifests.manifest_error(
                path, f"field {key!r} has {len(data[key])} entries, {data['model']} has {config.depth} blocks")
    if data["tokens_per_layer"] != schedule_tokens(config, data["schedule"]):
        raise manifests.manifest_error(path, "tokens_per_layer does not follow from schedule")


def read_manifest(artifact: Union[str, Path], sha256: Optional[str] = None) -> dict:
    """The manifest beside ``artifact`` (``mame_deploy.manifest.read_manifest``: present, well
    formed, and describing the artifact with ``sha256`` when given), checked to be rebuildable."""
    data = manifests.read_manifest(artifact, sha256)
    check_manifest(data, manifests.manifest_path(artifact))
    return data
