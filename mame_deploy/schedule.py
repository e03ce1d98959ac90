"""Fixed per-layer merge schedules: how many patch tokens leave right after each block.

A schedule is a list with one count per block (``schedule[i]`` tokens removed after block i).
It comes from ``--ratio R`` (round(R x patches) removed in total, spread over the default or
the named merge layers) or from an explicit ``--schedule layer:count,...``. Every count is a
constant, which is what gives the exported graph static shapes.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Mapping, Optional, Sequence, Union

from mame_deploy.errors import UserError
from mame_deploy.flops import block_macs, model_macs, relative_gflops

MAX_RATIO = 0.95
_STEP = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


def parse_schedule(text: str) -> dict[int, int]:
    """``"4:20,8:20"`` -> ``{4: 20, 8: 20}`` (layer: tokens removed after that block)."""
    if not isinstance(text, str) or not text.strip():
        raise UserError("empty `schedule`; write layer:count pairs such as 4:20,8:20")
    steps: dict[int, int] = {}
    for part in text.split(","):
        match = _STEP.match(part)
        if match is None:
            raise UserError(f"malformed schedule step {part.strip()!r} in {text!r}; "
                            "write layer:count pairs such as 4:20,8:20")
        layer, count = int(match[1]), int(match[2])
        if layer in steps:
            raise UserError(f"layer {layer} appears twice in `schedule` {text!r}; give each layer once")
        steps[layer] = count
    return steps


def parse_layers(text: str) -> list[int]:
    """``"2,5,8"`` -> ``[2, 5, 8]`` (the blocks after which ``--ratio`` merges)."""
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"malformed `layers` {text!r}; write block indices such as 2,5,8") from None
    return layers


def mergeable_layers(depth: int) -> range:
    """Blocks a merge may follow. After the last block only the class token is read, so a
    merge there would save nothing."""
    return range(depth - 1)


def default_merge_layers(depth: int) -> list[int]:
    """Every block but the last. Chosen on the digits validation split among several
    placements (docs/merging.md): spreading the reduction over all blocks kept the most
    accuracy at a given ratio, and removes tokens earliest, so it also saves the most FLOPs."""
    return list(mergeable_layers(depth))


def _as_layers(layers) -> list[int]:
    """Block numbers as a list; text or other types are refused here, not read character by
    character (``"2,5"`` would otherwise name blocks "2", "," and "5")."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not all(
            isinstance(layer, numbers.Integral) and not isinstance(layer, bool) for layer in layers):
        raise UserError(f"merge layers must be a list of block numbers such as [2, 5, 8], got {layers!r} "
                        "(on the command line: `layers` 2,5,8)")
    return [int(layer) for layer in layers]


def _check_layers(depth: int, layers: Sequence[int]) -> list[int]:
    layers = _as_layers(layers)
    allowed = mergeable_layers(depth)
    if not layers:
        raise UserError("no merge layers given; name at least one block, e.g. `layers` 2,5,8")
    for layer in layers:
        if layer not in allowed:
            raise UserError(f"merge layer {layer} is out of range: this model has {depth} blocks, "
                            f"merges may follow blocks 0..{depth - 2}")
    if len(set(layers)) != len(layers):
        raise UserError(f"merge layers {list(layers)} name a block twice; give each block once")
    return sorted(layers)


def check_schedule(config, schedule: Sequence[int]) -> list[int]:
    """Validate a full schedule (one count per block); returns it as a list of ints."""
    if len(schedule) != config.depth:
        raise UserError(f"a schedule needs one count per block ({config.depth}), got {len(schedule)}")
    patches = config.num_patches
    for layer, count in enumerate(schedule):
        if count < 0:
            raise UserError(f"layer {layer}: cannot remove a negative number of tokens ({count})")
        if count and layer not in mergeable_layers(config.depth):
            raise UserError(f"merge layer {layer} is out of range: this model has {config.depth} "
                            f"blocks, merges may follow blocks 0..{config.depth - 2}")
        if count > patches // 2:
            raise UserError(f"layer {layer} removes {count} tokens but only {patches} patches remain "
                            f"there; one step may remove at most half ({patches // 2})")
        patches -= count
    return [int(c) for c in schedule]


def schedule_from_counts(config, counts: Mapping[int, int]) -> list[int]:
    """Explicit ``{layer: count}`` -> full schedule, validated."""
    _check_layers(config.depth, list(counts))
    schedule = [0] * config.depth
    for layer, count in counts.items():
        schedule[layer] = int(count)
    return check_schedule(config, schedule)


def check_ratio(ratio: float) -> float:
    if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0.0 <= ratio <= MAX_RATIO:
        raise UserError(f"`ratio` must lie in [0, {MAX_RATIO}] (fraction of patch tokens removed), got {ratio}")
    return float(ratio)


def schedule_from_ratio(config, ratio: float, layers: Optional[Sequence[int]] = None) -> list[int]:
    """Remove round(ratio x patches) tokens over ``layers`` (default: ``default_merge_layers``),
    keeping a constant FRACTION of the patches at each merge layer (so every step respects the
    half-the-patches limit for as long as possible), with integer counts that add up exactly."""
    ratio = check_ratio(ratio)
    n = config.num_patches
    total = round(ratio * n)
    schedule = [0] * config.depth
    if total == 0:
        return schedule
    layers = _check_layers(config.depth, layers if layers is not None else default_merge_layers(config.depth))
    keep, current = n - total, n
    for j, layer in enumerate(layers, start=1):
        target = keep if j == len(layers) else round(n * (keep / n) ** (j / len(layers)))
        schedule[layer] = min(current - target, current // 2)
        current -= schedule[layer]
    if current != keep:
        raise UserError(f"ratio {ratio} removes {total} of {n} patches, which {len(layers)} merge layers cannot "
                        f"do (each step removes at most half of what is left); lower `ratio` or name more `layers`")
    return check_schedule(config, schedule)


ScheduleSpec = Union[str, Mapping[int, int], Sequence[int]]


def resolve_schedule(config, ratio: float = 0.0, schedule: Optional[ScheduleSpec] = None,
                     layers: Optional[Sequence[int]] = None) -> list[int]:
    """The full schedule from either ``ratio`` (+ ``layers``) or an explicit ``schedule``:
    ``"4:20,8:20"``, ``{4: 20, 8: 20}`` or a list with one count per block."""
    if schedule is None:
        return schedule_from_ratio(config, ratio, layers)
    if ratio:
        raise UserError("give either `ratio` or `schedule`, not both (an explicit schedule fixes the ratio)")
    if layers is not None:
        raise UserError("`layers` goes with `ratio`; an explicit `schedule` already names its layers")
    if isinstance(schedule, str):
        return schedule_from_counts(config, parse_schedule(schedule))
    if isinstance(schedule, Mapping):
        return schedule_from_counts(config, {int(k): int(v) for k, v in schedule.items()})
    return check_schedule(config, [int(c) for c in schedule])


def tokens_per_layer(config, schedule: Sequence[int]) -> list[int]:
    """Sequence length each block sees, class token included."""
    tokens, seen = config.num_patches + 1, []
    for count in schedule:
        seen.append(tokens)
        tokens -= count
    return seen


def schedule_text(schedule: Sequence[int]) -> str:
    """The explicit form (``layer:count,...``) of a schedule; "" when nothing merges."""
    return ",".join(f"{layer}:{count}" for layer, count in enumerate(schedule) if count)


def summary(config, schedule: Sequence[int]) -> list[dict]:
    """One row per block (tokens it sees, tokens removed after it, its share of the unmerged
    model's FLOPs) and a final ``total`` row with the model's relative GFLOPs."""
    tokens = tokens_per_layer(config, schedule)
    full = model_macs(config)
    rows = [
        {"block": str(i), "tokens": t, "removed": r, "relative_gflops": block_macs(config, t) / full}
        for i, (t, r) in enumerate(zip(tokens, schedule))
    ]
    rows.append({"block": "total", "tokens": tokens[-1] - schedule[-1], "removed": sum(schedule),
                 "relative_gflops": relative_gflops(config, tokens)})
    return rows
