"""The model zoo: Vision Mamba configurations behind a timm-style registry."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import torch.nn as nn

from mame_deploy.errors import UserError

from .checkpoint import load_checkpoint, read_state_dict
from .registry import ModelSpec, get_spec, list_models, register
from .vim import VimConfig, VisionMamba, init_weights

_OFFICIAL = "--checkpoint {file} (official); else random"

for _name, _dim, _file in (
    ("vim_t", 192, "vim_t_midclstok_76p1acc.pth"),
    ("vim_s", 384, "vim_s_midclstok_80p5acc.pth"),
    ("vim_b", 768, "vim_b_midclstok_81p9acc.pth"),
):
    register(ModelSpec(_name, VisionMamba, VimConfig(embed_dim=_dim), _OFFICIAL.format(file=_file)))

from . import digits  # noqa: E402,F401  (registers vim_digits)
from . import fashion  # noqa: E402,F401  (registers vim_fashion)


def _check_override(name: str, key: str, value, default) -> None:
    """Config fields are positive numbers of their default's kind (ints stay ints)."""
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return
    integral = isinstance(default, int)
    kind = "a whole number" if integral else "a number"
    number = isinstance(value, int if integral else (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise UserError(f"{name} config field {key} must be {kind} greater than 0, got {value!r} "
                        f"(e.g. `override` {key}={default})")


def model_config(name: str, **overrides):
    """The config of model ``name`` with ``overrides`` applied, each checked: unknown fields,
    values of the wrong kind and sizes that make no model are one-line UserErrors."""
    spec = get_spec(name)
    fields = {f.name for f in dataclasses.fields(spec.config)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise UserError(f"unknown option(s) {', '.join(bad)} for {name}; valid: {', '.join(sorted(fields))}")
    for key, value in overrides.items():
        _check_override(name, key, value, getattr(spec.config, key))
    config = dataclasses.replace(spec.config, **overrides)
    if config.patch_size > config.img_size:
        raise UserError(f"{name}: patch_size {config.patch_size} is larger than img_size {config.img_size}, "
                        "so the image has no patches; lower patch_size or raise img_size")
    return config


def create_model(
    name: str,
    checkpoint: Optional[str | Path] = None,
    seed: int = 0,
    scan_backend: str = "op",
    **overrides,
) -> nn.Module:
    """Build model ``name`` in eval mode: random weights from ``seed``, then ``checkpoint``
    (or the model's bundled weights) loaded strictly. ``overrides`` change config fields."""
    spec = get_spec(name)
    config = model_config(name, **overrides)
    model = init_weights(spec.build(config), seed)
    checkpoint = checkpoint if checkpoint is not None else spec.bundled_checkpoint
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, name)
    model.set_scan_backend(scan_backend)
    model.model_name = name
    model.checkpoint_path = str(checkpoint) if checkpoint is not None else None
    return model.eval()


__all__ = [
    "ModelSpec", "VimConfig", "VisionMamba", "create_model", "get_spec",
    "init_weights", "list_models", "load_checkpoint", "model_config", "read_state_dict", "register",
]
