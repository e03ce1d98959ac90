"""The merge record of fine-tuned weights: which merging a checkpoint was trained with.

``mame-deploy train MODEL --init W --ratio R --method M`` writes weights that only make sense
with that merging, so the checkpoint carries it under ``"merge"`` with the keys of
``mame_deploy.manifest.Source`` (method, ratio, schedule_spec, options) plus the resolved
per-block ``schedule``. ``with_checkpoint_merge`` fills those fields into a Source that names
no merging of its own; the CLI applies it to the Source its flags describe (``export``,
``bench --torch``), so the manifest records the merging and ``validate`` and ``bench`` rebuild
the same merged model from it as from any other export. A Source built in code is taken as it
is (bench's unmerged baseline of such an export stays unmerged).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from mame_deploy.errors import UserError
from mame_deploy.manifest import Source
from mame_deploy.schedule import schedule_text

MERGE_KEY = "merge"
RECORD_KEYS = ("method", "ratio", "schedule_spec", "options", "schedule")


def merge_record(model: nn.Module, ratio: float, schedule_spec: Optional[str]) -> Optional[dict]:
    """The record of a patched ``model`` (None when it merges nothing)."""
    schedule = [int(r) for r in getattr(model, "mame_schedule", None) or []]
    if not any(schedule):
        return None
    return {
        "method": model.mame_method,
        "ratio": float(ratio) if schedule_spec is None else 0.0,
        "schedule_spec": schedule_spec,
        "options": dict(model.mame_options),
        "schedule": schedule,
    }


def read_merge_record(path: str | Path) -> Optional[dict]:
    """The merge record of a checkpoint file, or None (official checkpoints, unmerged training)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not ours to judge here: loading the weights reports a bad file
        return None
    record = obj.get(MERGE_KEY) if isinstance(obj, dict) else None
    if record is None:
        return None
    if not isinstance(record, dict) or any(key not in record for key in RECORD_KEYS):
        raise UserError(f"checkpoint {path} has a malformed merge record (needs {', '.join(RECORD_KEYS)}); "
                        "write it again with `mame-deploy train`")
    return record


def names_no_merging(source: Source) -> bool:
    return source.ratio == 0 and source.schedule_spec is None and not source.options and source.method == "mame"


def with_checkpoint_merge(source: Source) -> Source:
    """``source`` with the merging its checkpoint was fine-tuned with, when it names none itself.
    An explicit ratio/schedule/method/option wins (e.g. to measure the weights at another ratio)."""
    if source.checkpoint is None or not names_no_merging(source):
        return source
    record = read_merge_record(source.checkpoint)
    if record is None:
        return source
    merged = replace(source, method=record["method"], ratio=float(record["ratio"]),
                     schedule_spec=record["schedule_spec"], options=dict(record["options"]))
    check_schedule(merged, record["schedule"])
    return merged


def check_schedule(source: Source, expected: list[int]) -> None:
    """The schedule this version builds from the record must be the one the weights were
    trained with (a changed default placement would otherwise merge differently)."""
    import dataclasses

    from mame_deploy.models import get_spec
    from mame_deploy.schedule import resolve_schedule

    config = dataclasses.replace(get_spec(source.model).config, **source.overrides)
    options = dict(source.options)
    layers = options.pop("layers", None)
    schedule = resolve_schedule(config, source.ratio, source.schedule_spec, layers)
    if schedule != [int(r) for r in expected]:
        raise UserError(f"checkpoint {source.checkpoint} was fine-tuned with merge schedule "
                        f"{schedule_text(expected)}, but its record builds {schedule_text(schedule)} with this "
                        f"version; pass `schedule` {schedule_text(expected)} explicitly")
