"""Loading checkpoints: the official ``{"model": state_dict}`` layout or a bare state dict.

A file is recognised as torch.save output (its zip archive or the legacy pickle format) before
torch reads it, so junk, text and folders get a message about what they are instead of an
unpickler's error; weights with NaN or Inf are refused, since they only yield garbage logits.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from mame_deploy.errors import UserError

_WRAPPER_KEYS = ("model", "state_dict", "model_ema")
# torch.save(..., _use_new_zipfile_serialization=False) starts with its magic number pickled
# with protocol 2; newer files are zip archives holding ARCHIVE/data.pkl.
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]


def check_checkpoint_path(path: str | Path) -> Path:
    """``path`` as a Path if it names a regular file, else a UserError saying what it is."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory; pass the path of a .pth/.pt file inside it")
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .pth/.pt file")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a regular file; pass the path of a .pth/.pt file")
    return path


def _looks_like_text(head: bytes) -> bool:
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character cut at the end of the sample is still text.
        try:
            head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return True


def _format_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a torch.save file, or None when it looks like one."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "is empty"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "is a damaged zip archive"
        if not any(name.endswith("data.pkl") for name in names):
            return "is a zip archive but not a PyTorch checkpoint (no data.pkl inside)"
        return None
    if head.startswith(_LEGACY_MAGIC):
        return None
    if _looks_like_text(head):
        return "is a text file, not a PyTorch checkpoint"
    return "is not a PyTorch checkpoint (not a file written by torch.save)"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = check_checkpoint_path(path)
    try:
        problem = _format_problem(path)
    except OSError as exc:
        raise UserError(f"checkpoint {path} cannot be read ({exc.strerror or exc})") from None
    if problem:
        raise UserError(f"checkpoint {path} {problem}; pass a .pth/.pt file saved with torch.save")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # The format is torch's, but it pickles objects other than tensors and containers,
        # which a safe load refuses (torch's advice to load unsafely is not ours to give).
        raise UserError(f"checkpoint {path} holds Python objects besides tensors, which are not loaded for "
                        "safety; save only the weights: torch.save({'model': model.state_dict()}, path)") from None
    except Exception as exc:  # torch raises many types for truncated or damaged files
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {path} is damaged and could not be read ({reason})") from None
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


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


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
    broken = non_finite_tensors(state)
    if broken:
        raise UserError(f"checkpoint {path} has NaN or Inf weights in {len(broken)} tensor(s): {_summarise(broken)}; "
                        "a model with them computes meaningless outputs -- use an intact checkpoint")
    model.load_state_dict(state, strict=True)
    return model
