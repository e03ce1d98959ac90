"""Writing artifacts safely: every file goes to a temporary name beside its target and is
renamed over it, so a crash or an error never leaves a truncated .onnx/.json/.plan behind, and
nothing that exists is replaced unless the user said ``--force``."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Union

from mame_deploy.errors import UserError
from mame_deploy.models.checkpoint import file_sha256

PathLike = Union[str, Path]

__all__ = ["check_writable", "file_sha256", "sha256_bytes", "write_bytes", "write_json"]


def check_writable(paths: Iterable[PathLike], force: bool) -> None:
    """Fail before any work is done if an output exists (without ``force``) or is a folder."""
    paths = [Path(p) for p in paths]
    for path in paths:
        if path.is_dir():
            raise UserError(f"{path} is a directory; pass a file name for the output")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise UserError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                        "pass --force to overwrite, or choose another --output")


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Atomically replace ``path`` with ``data`` (temporary file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: PathLike, obj) -> Path:
    """Sorted keys and a trailing newline: the same object always gives the same bytes."""
    return write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
