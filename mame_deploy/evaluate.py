"""Top-1 accuracy of (merged) models on labelled images, the method x ratio sweep, its plot."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from mame_deploy.errors import UserError
from mame_deploy.flops import relative_gflops
from mame_deploy.merge import METHODS
from mame_deploy.patch import patch
from mame_deploy.schedule import check_ratio, tokens_per_layer

Progress = Callable[[int], None]  # called with the number of images just evaluated


@dataclass
class Setting:
    """One merging configuration to evaluate."""

    method: str = "mame"
    ratio: float = 0.0
    schedule: Optional[str] = None
    layers: Optional[list[int]] = None
    options: Optional[dict] = None


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 128, limit: Optional[int] = None,
             progress: Optional[Progress] = None) -> tuple[int, int]:
    """(correct, total) top-1 over ``dataset`` (the first ``limit`` images if given)."""
    if batch_size < 1:
        raise UserError(f"`batch_size` must be at least 1, got {batch_size}")
    check_limit(limit)
    model.eval()
    correct = total = 0
    for images, labels in dataset.batches(batch_size):
        if limit is not None and total >= limit:
            break
        if limit is not None:
            images, labels = images[: limit - total], labels[: limit - total]
        correct += int((model(images).argmax(dim=-1) == labels).sum())
        total += len(labels)
        if progress is not None:
            progress(len(labels))
    if total == 0:
        raise UserError(f"{getattr(dataset, 'name', 'the data set')} holds no images to evaluate")
    return correct, total


def check_limit(limit: Optional[int]) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"`limit` must be at least 1 (the number of images to evaluate), got {limit}")


def random_weights(model) -> bool:
    """True for a model of ``create_model`` that loaded no checkpoint (seeded random weights)."""
    return hasattr(model, "checkpoint_path") and model.checkpoint_path is None


def evaluate_setting(model, dataset, setting: Setting, batch_size: int = 128, limit: Optional[int] = None,
                     progress: Optional[Progress] = None) -> dict:
    """Patch ``model`` as ``setting`` says, evaluate it and describe the result as one record."""
    patch(model, ratio=setting.ratio, schedule=setting.schedule, method=setting.method,
          layers=setting.layers, **(setting.options or {}))
    correct, total = evaluate(model, dataset, batch_size, limit, progress)
    cfg = model.config
    tokens = tokens_per_layer(cfg, model.mame_schedule)
    removed = sum(model.mame_schedule)
    return {
        "model": getattr(model, "model_name", None),
        "weights": getattr(model, "checkpoint_path", None),
        "random_weights": random_weights(model),
        "data": dataset.name,
        "method": setting.method,
        "ratio": setting.ratio if setting.schedule is None else round(removed / cfg.num_patches, 6),
        "schedule": list(model.mame_schedule),
        "options": dict(model.mame_options),
        "accuracy": correct / total,
        "correct": correct,
        "images": total,
        "tokens_per_layer": tokens,
        "relative_gflops": round(relative_gflops(cfg, tokens), 6),
    }


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"malformed `ratios` {text!r}; write numbers such as 0,0.3,0.5,0.7") from None
    return [check_ratio(r) for r in ratios]


def parse_methods(text: str) -> list[str]:
    methods = [part.strip() for part in text.split(",") if part.strip()]
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise UserError(f"unknown method(s) {', '.join(bad) or repr(text)} in `methods`; use {', '.join(METHODS)}")
    return methods


def sweep(model, dataset, methods: Sequence[str], ratios: Sequence[float], layers: Optional[list[int]] = None,
          options: Optional[dict] = None, batch_size: int = 128, limit: Optional[int] = None,
          progress: Optional[Progress] = None) -> list[dict]:
    """Every (method, ratio) pair on the same model and images, one record each.
    ``options`` (ablation switches) apply to mame only, so the baselines stay as defined."""
    records = []
    for method in methods:
        for ratio in ratios:
            setting = Setting(method, ratio, layers=layers, options=options if method == "mame" else None)
            records.append(evaluate_setting(model, dataset, setting, batch_size, limit, progress))
    return records


def plot_sweep(records: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Accuracy vs ratio, one line per method (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mame_deploy.artifacts import write_bytes

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method in dict.fromkeys(r["method"] for r in records):
        rows = sorted((r for r in records if r["method"] == method), key=lambda r: r["ratio"])
        ax.plot([r["ratio"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", label=method)
    ax.set_xlabel("ratio of patch tokens removed")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return write_bytes(path, buffer.getvalue())
