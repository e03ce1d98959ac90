"""Model registry: names -> configurations, weights and a constructor (timm-style)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch.nn as nn

from mame_deploy.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]  # build(**overrides) -> randomly initialised model
    config: object                    # the model's config (VimConfig)
    weights: str                      # where trained weights come from, for humans
    bundled_checkpoint: Optional[Path] = None  # shipped weights loaded by default
    info: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(
            f"unknown model {name!r}; available: {', '.join(list_models())}"
        ) from None
