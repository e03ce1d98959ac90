"""Loading checkpoints: the official ``{"model": state_dict}`` layout or a bare state dict."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn

from mame_deploy.errors import UserError

_WRAPPER_KEYS = ("model", "state_dict", "model_ema")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .pth/.pt file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {path} could not be read as a PyTorch file ({reason})") from None
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(
            f"checkpoint {path} holds no state dict (expected {{'model': state_dict}} or a "
            f"bare state dict of tensors)"
        )
    return obj


def _summarise(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_checkpoint(model: nn.Module, path: str | Path, model_name: str = "model") -> nn.Module:
    """Strict load; a file that does not fit fails with one message naming what differs."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_summarise(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (file vs model): {_summarise(mismatched)}")
        raise UserError(
            f"checkpoint {path} does not fit {model_name}: " + "; ".join(parts)
            + ". Is it a checkpoint of another model size?"
        )
    model.load_state_dict(state, strict=True)
    return model
