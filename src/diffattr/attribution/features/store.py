"""On-disk feature store: memory-mapped arrays, JSON metadata, per-row completion flags.

Layout of a store directory::

    meta.json       settings that produced the features (model fingerprint, measure, timesteps,
                    normalisation, projector, dtype, dataset fingerprint, ids) — checked on reopen
    features.npy    (N, k) float32 memmap: φ(z) per row
    error.npy       (N,) float32: per-sample training error e = mean_t ‖ε_θ − ε‖²/d
    residual.npy    (N,) float32: per-sample reduced residual r = mean_t mean(ε_θ − ε)
    done.npy        (N,) uint8: 0 missing, 1 done, 2 skipped (non-finite; zeros, scored 0)
    claims/         one file per row being computed: ``row-R``, holding ``PID HOST``

Crash safety. The store is created complete (files preallocated, ``meta.json`` last) under a
temporary name and renamed into place, so a store either exists whole or not at all, and a
full disk shows at creation (preallocation), not as a crash in a memory-mapped write. A row's
data is written and flushed before its flag, so a process killed at any point leaves only
complete rows marked done; rerunning computes exactly the missing rows.

Concurrency. Several processes may fill disjoint (or even the same) rows of one store. Before
computing a row a writer claims it: it creates ``claims/row-R`` (``O_CREAT | O_EXCL``) and
holds an exclusive ``flock`` on it until the row's data and flag are on disk, then removes
it. A claim whose lock can be taken belongs to a process that died (the kernel drops a dead
process's locks); it is taken over. Rows are separate bytes of the memory maps, so writes to
different rows never interfere; a claimed row is re-checked after claiming, so it is never
computed twice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.errors import DiffattrError, StoreMismatchError, storage_error
from diffattr.fsio import atomic_write_json, read_json

COLUMNS = ("error", "residual")
FORMAT_VERSION = 1
MISSING, DONE, SKIPPED = 0, 1, 2


def release_pages(array: np.ndarray) -> None:
    """Drop a memory-mapped array's pages from this process's resident set.

    The data stays in the file (and the OS page cache); the next access faults it back in.
    Streaming a store larger than memory through a mapping would otherwise keep every page
    it touched counted in the process's RSS. Safe for shared mappings after ``flush()``;
    a no-op for arrays that are not memory-mapped or where ``madvise`` is unavailable.
    """
    mm = getattr(array, "_mmap", None)
    advise = getattr(mm, "madvise", None)
    if advise is not None and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            advise(mmap.MADV_DONTNEED)


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _open_memmap(path: Path, mode: str) -> np.memmap:
    """Open a store array; a missing, truncated or unreadable file is a clear error.

    (``np.memmap`` in mode ``r+`` would silently extend a truncated file with zeros.)
    """
    damaged = "the store is damaged; delete its directory and featurize again"
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read(f)
            needed = f.tell() + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        size = os.path.getsize(path)
        if size < needed:
            raise DiffattrError(
                f"feature store file {path} is truncated ({size} of {needed} bytes)", hint=damaged
            )
        return np.lib.format.open_memmap(path, mode=mode)
    except FileNotFoundError as exc:
        raise DiffattrError(f"feature store file {path} is missing", hint=damaged) from exc
    except (OSError, ValueError, EOFError) as exc:
        raise DiffattrError(f"feature store file {path} is damaged: {exc}", hint=damaged) from exc


class FeatureStore:
    """Features of one set of samples (training set or targets) under fixed settings."""

    def __init__(self, path: Path, meta: dict[str, Any], mode: str = "r+") -> None:
        self.path = path
        self.meta = meta
        self.created = False  # set by :meth:`open` when this call made the store
        try:
            n, k = int(meta["num_rows"]), int(meta["dim"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DiffattrError(
                f"{path / 'meta.json'} is not feature store metadata",
                hint="the store is damaged; delete its directory and featurize again",
            ) from exc
        self.features = _open_memmap(path / "features.npy", mode)
        self.columns = {c: _open_memmap(path / f"{c}.npy", mode) for c in COLUMNS}
        self.done = _open_memmap(path / "done.npy", mode)
        expected = {"features.npy": (n, k), "done.npy": (n,)}
        expected.update({f"{c}.npy": (n,) for c in COLUMNS})
        arrays = {"features.npy": self.features, "done.npy": self.done}
        arrays.update({f"{c}.npy": self.columns[c] for c in COLUMNS})
        for name, shape in expected.items():
            if arrays[name].shape != shape:
                raise DiffattrError(
                    f"{path / name} has shape {arrays[name].shape}, expected {shape}",
                    hint="the store is damaged; delete it and featurize again",
                )

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls, path: str | Path, settings: dict[str, Any], num_rows: int, dim: int
    ) -> FeatureStore:
        """Open the store at ``path`` for ``settings``, creating it if absent.

        An existing store made with any other setting is refused, naming the field. Safe when
        several processes open (and create) the same store at once.
        """
        path = Path(path)
        meta = {
            "format_version": FORMAT_VERSION,
            "num_rows": int(num_rows),
            "dim": int(dim),
            "dtype": "float32",
            "settings": _canonical(settings),
        }
        created = False
        if not (path / "meta.json").is_file():
            if num_rows <= 0:
                raise DiffattrError("cannot create a feature store with no rows")
            created = _create(path, meta)
        have = read_json(path / "meta.json")
        _check_meta(have, meta, path)
        store = cls(path, have, mode="r+")
        store.created = created
        return store

    @classmethod
    def load(cls, path: str | Path, require_complete: bool = True) -> FeatureStore:
        """Open an existing store read-only."""
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise DiffattrError(
                f"no feature store at {path}", hint="run `diffattr featurize` first"
            )
        store = cls(path, read_json(path / "meta.json"), mode="r")
        if require_complete and not store.is_complete():
            raise DiffattrError(
                f"feature store {path} is incomplete ({store.num_done}/{store.num_rows} rows)",
                hint="rerun `diffattr featurize` with the same options to finish it",
            )
        return store

    # ------------------------------------------------------------------ state
    @property
    def settings(self) -> dict[str, Any]:
        return self.meta["settings"]

    @property
    def num_rows(self) -> int:
        return int(self.meta["num_rows"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def num_done(self) -> int:
        """Rows finished: computed, or skipped as non-finite."""
        return int(np.count_nonzero(self.done))

    def is_complete(self) -> bool:
        return self.num_done == self.num_rows

    def missing_rows(self) -> np.ndarray:
        """Row indices not yet written."""
        return np.flatnonzero(np.asarray(self.done) == MISSING)

    def skipped_rows(self) -> np.ndarray:
        """Rows (positions in the store, not ids) skipped because their features were not
        finite (stored as zeros)."""
        return np.flatnonzero(np.asarray(self.done) == SKIPPED)

    # ------------------------------------------------------------------ writing
    def write_rows(self, rows: np.ndarray, features: np.ndarray, **columns: np.ndarray) -> None:
        """Write complete rows: data first, flushed to disk, then their done flags."""
        rows = np.asarray(rows, dtype=np.int64)
        features = np.asarray(features, dtype=np.float32)
        if features.shape != (rows.size, self.dim):
            raise DiffattrError(
                f"rows of shape {features.shape} do not fit store {self.path} "
                f"({rows.size} × {self.dim} expected)"
            )
        finite = np.isfinite(features).all(axis=1)
        for c in COLUMNS:
            if c in columns:
                finite &= np.isfinite(np.asarray(columns[c], dtype=np.float32))
        if not finite.all():
            bad = int(rows[~finite][0])
            raise DiffattrError(
                f"non-finite features for row {bad} (sample id {int(self.ids()[bad])}); "
                "nothing was written"
            )
        self.features[rows] = features
        for c in COLUMNS:
            if c in columns:
                self.columns[c][rows] = np.asarray(columns[c], dtype=np.float32)
        self._flush_data()
        self.done[rows] = DONE
        self.done.flush()
        release_pages(self.features)

    def skip_rows(self, rows: np.ndarray) -> None:
        """Record rows as skipped: zero features and columns (so they score 0), flag 2."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        self.features[rows] = 0.0
        for c in COLUMNS:
            self.columns[c][rows] = 0.0
        self._flush_data()
        self.done[rows] = SKIPPED
        self.done.flush()

    def _flush_data(self) -> None:
        self.features.flush()
        for c in COLUMNS:
            self.columns[c].flush()

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive advisory lock on the whole store (one process at a time).

        Not needed to fill rows (:meth:`claims` lets writers share a store); for operations
        that must exclude every other user of the store.
        """
        fd = os.open(self.path / ".lock", os.O_CREAT | os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise DiffattrError(
                    f"another process is writing feature store {self.path}",
                    hint="wait for it to finish, or give each worker its own rows",
                ) from exc
            yield
        finally:
            os.close(fd)

    def claims(self) -> RowClaims:
        """Per-row claims of this store (release them with :meth:`RowClaims.release_all`)."""
        return RowClaims(self.path / "claims")

    # ------------------------------------------------------------------ reading
    def column(self, name: str) -> np.ndarray:
        return np.asarray(self.columns[name])

    def ids(self) -> np.ndarray:
        return np.asarray(self.settings.get("ids", np.arange(self.num_rows)), dtype=np.int64)


# ---------------------------------------------------------------------------- creation


def _preallocate(path: Path) -> None:
    """Reserve the blocks of ``path`` now, so a full disk fails here, not in a memmap write."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        os.fsync(fd)
    finally:
        os.close(fd)


def _create(path: Path, meta: dict[str, Any]) -> bool:
    """Create the store at ``path`` atomically; False if another process created it first."""
    n, k = meta["num_rows"], meta["dim"]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(path.parent, exc) from exc
    if path.exists() and not (path / "meta.json").is_file() and any(path.iterdir()):
        _discard_incomplete(path)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        arrays = [("features.npy", np.float32, (n, k)), ("done.npy", np.uint8, (n,))]
        arrays += [(f"{c}.npy", np.float32, (n,)) for c in COLUMNS]
        for name, dtype, shape in arrays:
            m = np.lib.format.open_memmap(tmp / name, mode="w+", dtype=dtype, shape=shape)
            m.flush()
            del m
            _preallocate(tmp / name)
        atomic_write_json(tmp / "meta.json", meta)
        try:
            os.rename(tmp, path)  # replaces a missing or empty directory; fails on a full one
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and (path / "meta.json").is_file():
                return False  # another process created the store first
            raise
        tmp = None
        return True
    except DiffattrError:
        raise
    except OSError as exc:
        raise storage_error(path, exc) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _discard_incomplete(path: Path) -> None:
    """Move a store directory without ``meta.json`` (an interrupted old-style creation) away."""
    aside = path.with_name(f".{path.name}.{os.getpid()}.incomplete")
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------------------- claims


@dataclass
class Claim:
    """Outcome of :meth:`RowClaims.try_claim`.

    ``acquired``: the row is ours. ``pid``/``host``: the other claimant (not acquired), or the
    dead one whose claim we took over (``stale``).
    """

    acquired: bool
    pid: int | None = None
    host: str | None = None
    stale: bool = False


class RowClaims:
    """Claim files ``row-R`` in one directory; see the module docstring for the protocol."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.held: dict[int, int] = {}  # row -> fd holding the lock
        self._stamp = f"{os.getpid()} {socket.gethostname()}\n".encode()

    def _path(self, row: int) -> Path:
        return self.dir / f"row-{int(row)}"

    def _make_dir(self) -> None:
        """Create the claims directory. Another writer removes it when it falls empty, so
        ``mkdir(exist_ok=True)`` can find it existing and then gone (FileExistsError): retry."""
        while True:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                return
            except FileExistsError as exc:
                if self.dir.exists() and not self.dir.is_dir():  # a file in the way
                    raise storage_error(self.dir, exc) from exc
            except OSError as exc:
                raise storage_error(self.dir, exc) from exc

    def try_claim(self, row: int) -> Claim:
        """Claim ``row`` unless a live process holds it (never blocks)."""
        row = int(row)
        if row in self.held:
            return Claim(True)
        path = self._path(row)
        self._make_dir()
        while True:
            created = True
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                created = False
                try:
                    fd = os.open(path, os.O_RDWR)
                except FileNotFoundError:
                    continue  # released meanwhile: try again
            except FileNotFoundError:  # the claims directory was removed when it fell empty
                self._make_dir()
                continue
            except OSError as exc:
                raise storage_error(path, exc) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, host = _read_stamp(fd)
                os.close(fd)
                return Claim(False, pid, host)
            try:  # the lock is ours; make sure the path still names this file
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            pid, host = (None, None) if created else _read_stamp(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._stamp, 0)
            self.held[row] = fd
            return Claim(True, pid, host, stale=not created)

    def release(self, row: int) -> None:
        """Remove the claim on ``row`` (after its data and done flag are on disk)."""
        fd = self.held.pop(int(row), None)
        if fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(row))  # unlinked while still locked: no one inherits it
        os.close(fd)

    def clear_finished(self, done: np.ndarray) -> int:
        """Remove claims that dead processes left on rows already ``done`` (a process killed
        between writing a row's done flag and releasing its claim); returns how many."""
        if not self.dir.is_dir():
            return 0
        cleared = 0
        for path in self.dir.glob("row-*"):
            try:
                row = int(path.name[4:])
            except ValueError:
                continue
            if row in self.held or not 0 <= row < len(done) or done[row] == 0:
                continue
            if self.try_claim(row).acquired:  # not held by a live process
                self.release(row)
                cleared += 1
        with contextlib.suppress(OSError):
            self.dir.rmdir()  # only when empty
        return cleared

    def release_all(self) -> None:
        for row in list(self.held):
            self.release(row)
        with contextlib.suppress(OSError):
            self.dir.rmdir()  # only when empty

    def active(self) -> dict[int, int | None]:
        """Rows claimed by other live processes: row -> PID (None when unknown)."""
        out: dict[int, int | None] = {}
        if not self.dir.is_dir():
            return out
        for p in self.dir.glob("row-*"):
            try:
                row = int(p.name[4:])
            except ValueError:
                continue
            if row in self.held:
                continue
            try:
                fd = os.open(p, os.O_RDWR)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    out[row] = _read_stamp(fd)[0]
            finally:
                os.close(fd)
        return out


def _read_stamp(fd: int) -> tuple[int | None, str | None]:
    try:
        parts = os.pread(fd, 256, 0).decode(errors="replace").split()
        return int(parts[0]), (parts[1] if len(parts) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None, None


# ---------------------------------------------------------------------------- settings


def _check_meta(have: dict[str, Any], want: dict[str, Any], path: Path) -> None:
    if not isinstance(have, dict):
        raise DiffattrError(
            f"{path / 'meta.json'} is not feature store metadata",
            hint="the store is damaged; delete its directory and featurize again",
        )
    for key in ("format_version", "num_rows", "dim", "dtype"):
        if have.get(key) != want[key]:
            raise StoreMismatchError(
                f"feature store {path} has {key}={have.get(key)!r}, requested {want[key]!r}",
                hint="use another store directory, or delete this one to start over",
            )
    mismatch = _first_difference(have.get("settings", {}), want["settings"])
    if mismatch is not None:
        field, old, new = mismatch
        raise StoreMismatchError(
            f"feature store {path} was made with {field}={old!r}, requested {new!r}",
            hint="use another store directory, or delete this one to start over",
        )


def _first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    if a != b:
        name = prefix[:-1]
        if isinstance(a, list) and isinstance(b, list) and len(a) > 8:
            return name, f"[{len(a)} values]", f"[{len(b)} values, differing]"
        return name, a, b
    return None
