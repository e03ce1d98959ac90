"""Writing artifacts safely, and reading them: hashes, sizes, ONNX files.

Every file is first written in full to a temporary name beside its target; only then are the
targets published, all of a group (``NAME.onnx`` + ``NAME.json``) after all of its temporaries
exist, so a crash, a full disk or Ctrl-C / SIGTERM never leaves a truncated file or half a pair.
Publishing without ``force`` is a hard link of the temporary to the target, which fails when the
target exists: of two processes writing the same output, exactly one succeeds and the other is
told the file exists. With ``force`` the temporary is renamed over the target. ``check_writable``
is the same rules, applied before any work is done.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence, Union

import onnx
from google.protobuf.message import DecodeError

from mame_deploy.errors import UserError

PathLike = Union[str, Path]

__all__ = ["check_writable", "file_sha256", "format_bytes", "read_onnx", "sha256_bytes", "write_bytes", "write_files",
           "write_json"]

# Filesystems without hard links (FAT, some network mounts) answer os.link with one of these.
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS, errno.EMLINK}


def _exists_message(paths: Sequence[str]) -> str:
    return (f"{', '.join(paths)} already exist{'s' if len(paths) == 1 else ''}; "
            "pass `force` to overwrite, or choose another `output`")


def _nearest_folder(path: Path) -> Path:
    """The folder the output will be written into, or its nearest ancestor that exists (the
    rest is created when writing)."""
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _probe(folder: Path) -> None:
    """Create and remove a file in ``folder``: the only test that is true for every reason a
    write may be refused (permissions, read-only mounts, root squash, quotas at zero)."""
    if not folder.is_dir():
        raise UserError(f"cannot write into {folder}: it is not a folder; choose another output path")
    try:
        fd, name = tempfile.mkstemp(prefix=".mame-deploy-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise UserError(f"cannot write into {folder} ({exc.strerror or exc}); choose a writable folder "
                        "for the output") from None


def check_writable(paths: Iterable[PathLike], force: bool) -> None:
    """Fail before any work is done if an output exists (without ``force``), is a folder, or
    lies in a folder this process cannot write."""
    paths = [Path(p) for p in paths]
    for path in paths:
        if path.is_dir():
            raise UserError(f"{path} is a directory; pass a file name for the output")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise UserError(_exists_message(existing))
    for folder in dict.fromkeys(_nearest_folder(p) for p in paths):
        _probe(folder)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_temporary(path: Path, data: bytes) -> str:
    """``data`` in full, synced, in a temporary file beside ``path``; returns its name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; artifacts are meant to be shared
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _publish(tmp: str, path: Path, force: bool) -> None:
    """Make the temporary visible as ``path``: replacing it with ``force``, else only if
    ``path`` does not exist at this very moment (FileExistsError otherwise)."""
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic and exclusive: fails if path exists
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        # No hard links here: claim the name exclusively, then rename over our own claim.
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.replace(tmp, path)


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a folder; the files themselves are synced
    finally:
        os.close(fd)


def _check_space(files: Sequence[tuple[Path, bytes]]) -> None:
    """Refuse before writing when the folder's filesystem has less room than the files need."""
    need: dict[Path, int] = {}
    for path, data in files:
        need[path.parent] = need.get(path.parent, 0) + len(data)
    for folder, size in need.items():
        try:
            stat = os.statvfs(folder)
        except (OSError, AttributeError):
            continue
        free = stat.f_bavail * stat.f_frsize
        if size > free:
            raise UserError(f"not enough disk space in {folder}: the output needs {format_bytes(size)}, "
                            f"{format_bytes(free)} is free; free some space or choose another folder")


def write_files(files: Sequence[tuple[PathLike, bytes]], force: bool = False) -> list[Path]:
    """Write every ``(path, data)`` of ``files`` or none of them.

    All temporaries are written first; then each target is published (see ``_publish``). If a
    publish fails, the targets already published by this call are removed again, so a group
    is never left half-written. Write errors (full disk, read-only folder) become UserErrors.
    """
    files = [(Path(p), bytes(data)) for p, data in files]
    temporaries: list[str] = []
    published: list[Path] = []
    current = files[0][0] if files else None
    try:
        for path, _ in files:
            current = path
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                raise UserError(f"cannot create the folder {path.parent}: a file has that name; "
                                "choose another output path") from None
        _check_space(files)
        for path, data in files:
            current = path
            temporaries.append(_write_temporary(path, data))
        for (path, _), tmp in zip(files, temporaries):
            current = path
            _publish(tmp, path, force)
            published.append(path)
        for folder in dict.fromkeys(path.parent for path, _ in files):
            _sync_folder(folder)
    except BaseException as exc:
        for path in published:
            path.unlink(missing_ok=True)
        if isinstance(exc, FileExistsError):
            raise UserError(_exists_message([str(current)]) + " (it appeared while this command ran)") from None
        if isinstance(exc, OSError):
            raise UserError(f"could not write {current} ({exc.strerror or exc}); nothing was written") from None
        raise
    finally:
        for tmp in temporaries:
            Path(tmp).unlink(missing_ok=True)  # linked or failed: the temporary name goes
    return [path for path, _ in files]


def write_bytes(path: PathLike, data: bytes, force: bool = True) -> Path:
    """Atomically write ``data`` to ``path``; it replaces an existing file unless ``force`` is
    False (then an existing file is a UserError, decided at the moment of publishing)."""
    return write_files([(path, data)], force)[0]


def json_bytes(obj) -> bytes:
    """Sorted keys and a trailing newline: the same object always gives the same bytes."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_json(path: PathLike, obj, force: bool = True) -> Path:
    return write_bytes(path, json_bytes(obj), force)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading


def file_sha256(path: Union[str, Path]) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def format_bytes(n: float) -> str:
    """A size in decimal units, e.g. 60.2 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")



def read_onnx(path: Union[str, Path]) -> tuple[onnx.ModelProto, bytes]:
    """The model in ``path`` and the file's bytes (read once: hash them, hand them to a runtime),
    or a UserError saying why the file is not a usable ONNX model."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; export a model first with `mame-deploy export`")
    if not path.is_file():
        raise UserError(f"{path} is not a file; pass the .onnx file written by `mame-deploy export`")
    try:
        data = path.read_bytes()
        model = onnx.load_from_string(data)
    except (OSError, DecodeError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable ONNX model ({reason})") from None
    # Many non-ONNX files decode as an empty protobuf message: require an actual graph.
    if not model.graph.node or not model.opset_import:
        raise UserError(f"{path} is not an ONNX model (no graph inside); pass a file written by `mame-deploy export`")
    return model, data
