"""``mame_deploy.patch``: turn token merging on (or off) for a Vision Mamba, in place (ToMe-style)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn

from mame_deploy.errors import UserError
from mame_deploy.merge import TokenMerge, merge_options
from mame_deploy.schedule import ScheduleSpec, resolve_schedule


def patch(
    model: nn.Module,
    ratio: float = 0.0,
    schedule: Optional[ScheduleSpec] = None,
    method: str = "mame",
    layers: Optional[Sequence[int]] = None,
    **options,
) -> nn.Module:
    """Merge tokens between the blocks of ``model`` at a fixed schedule; returns ``model``.

    ``ratio``: fraction of patch tokens removed in total, spread over ``layers`` (default: the
    measured default placement); or ``schedule``: ``"4:20,8:20"``, ``{4: 20}`` or one count per
    block. ``method``: "mame", "tome" or "prune"; ``options``: the switches of
    ``mame_deploy.merge.MergeOptions``. Patching again replaces the schedule; ``ratio=0``
    computes exactly what the unpatched model does.

    Sets ``model.mame_schedule`` (tokens removed after each block), ``model.mame_method`` and
    ``model.mame_options`` (a JSON-able dict that ``patch(..., **options)`` accepts back).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "layers"):
        raise UserError(f"cannot patch a {type(model).__name__}: token merging needs a Vision Mamba "
                        "from mame_deploy.create_model")
    opts = merge_options(method, **options)
    counts = resolve_schedule(config, ratio, schedule, layers)
    model.token_merge = TokenMerge(counts, method, opts)
    model.mame_schedule = counts
    model.mame_method = method
    model.mame_options = {**opts.as_dict(), "layers": sorted(layers) if layers is not None else None}
    return model
