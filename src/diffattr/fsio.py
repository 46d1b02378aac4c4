"""Crash-safe file writes: write to a temporary sibling, fsync, then rename into place.

A reader therefore sees either the old file or the complete new one, never a half-written one.
A process killed mid-write leaves at most a hidden ``.NAME.*.tmp`` sibling, which no reader
looks at. Write failures (disk full, read-only file system, no permission) become a
:class:`~diffattr.errors.StorageError` naming the file, and the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from diffattr.errors import DiffattrError, StorageError, storage_error


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()

#: A write that failed with a library's own exception type is reported as a full disk when
#: its message says so, or when fewer than this many bytes are left.
_NEARLY_FULL = 64 << 10
_DISK_FULL_TEXT = ("No space left", "os error 28", "Disk quota exceeded", "os error 122")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _as_storage_error(path: Path, exc: BaseException, probe: Path) -> BaseException:
    """The :class:`StorageError` to raise for ``exc`` while writing ``path``, else ``exc``.

    ``probe``: a path on the same file system, checked for free space when a library reported
    a failed write with an exception type of its own (e.g. safetensors' ``SafetensorError``,
    torch.save's ``RuntimeError``); call it before the temporary output is removed, while the
    disk is still full.
    """
    if isinstance(exc, DiffattrError) or not isinstance(exc, Exception):
        return exc
    if isinstance(exc, OSError) and exc.errno is not None:
        return storage_error(path, exc)
    text = str(exc)
    free = _free_bytes(probe)
    if any(s in text for s in _DISK_FULL_TEXT) or (free is not None and free < _NEARLY_FULL):
        return storage_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    return exc


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) or raise a :class:`DiffattrError` naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise StorageError(f"cannot create directory {path}: a file is in the way") from exc
    except OSError as exc:
        raise StorageError(
            f"cannot create directory {path}: {exc.strerror or exc}",
            hint="choose another output location",
        ) from exc
    if not os.access(path, os.W_OK):
        raise StorageError(f"directory {path} is not writable", hint="choose another --out")
    return path


def first_missing_ancestor(path: str | Path) -> Path | None:
    """The outermost directory of ``path`` (itself included) that does not exist yet."""
    path = Path(path).absolute()
    missing = None
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            break
        missing = p
    return missing


@contextlib.contextmanager
def removed_on_error(
    path: str | Path, keep: Callable[[Path], bool] | None = None
) -> Iterator[None]:
    """Remove what the block created of ``path`` if it fails with an error.

    Only directories that did not exist before the block are removed (the outermost of them),
    and not when ``keep(path)`` says the block left resumable work there.
    """
    created = first_missing_ancestor(path)
    try:
        yield
    except BaseException:
        if created is not None and created.exists() and not (keep and keep(Path(path))):
            shutil.rmtree(created, ignore_errors=True)
        raise


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(fh)`` on a temporary sibling of ``path``, fsync, then rename it to ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        err = _as_storage_error(path, exc, path.parent if path.parent.exists() else Path("."))
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if err is exc:
            raise
        raise err from exc
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_npz(path: str | Path, **arrays: Any) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` to ``path`` atomically."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def claim_manifest(path: str | Path, manifest: dict[str, Any], keys: tuple[str, ...], what: str):
    """Write ``manifest`` to ``path``, or check that the one there agrees on ``keys``: a
    :class:`DiffattrError` saying that ``path``'s directory holds ``what`` of other settings."""
    path = Path(path)
    if not path.is_file():
        atomic_write_json(path, manifest)
        return
    have = read_json(path)
    for key in keys:
        if have.get(key) != manifest[key]:
            raise DiffattrError(
                f"{path.parent} holds {what} with other {key} settings",
                hint="use another --out directory, or the original settings",
            )


def read_json(path: str | Path) -> Any:
    """Read a JSON file, raising a :class:`DiffattrError` naming it when unreadable."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DiffattrError(f"{path} does not exist") from exc
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise DiffattrError(f"cannot read {path}: {exc}") from exc


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name; rename it to ``path`` only on success.

    Every file in it is fsynced before the rename. An existing ``path`` is replaced. On error
    the temporary directory is removed; write failures become a :class:`StorageError`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        err = _as_storage_error(path, exc, tmp or path.parent)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if err is exc:
            raise
        raise err from exc


__all__ = [
    "atomic_directory",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "ensure_writable_dir",
    "first_missing_ancestor",
    "read_json",
    "removed_on_error",
]
