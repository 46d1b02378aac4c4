"""On-disk feature store: memory-mapped arrays, JSON metadata, per-row completion flags.

Layout of a store directory::

    meta.json       settings that produced the features (model fingerprint, measure, timesteps,
                    normalisation, projector, dtype, dataset fingerprint, ids) — checked on reopen
    features.npy    (N, k) float32 memmap: φ(z) per row
    error.npy       (N,) float32: per-sample training error e = mean_t ‖ε_θ − ε‖²/d
    residual.npy    (N,) float32: per-sample reduced residual r = mean_t mean(ε_θ − ε)
    done.npy        (N,) uint8: 1 once a row's data is on disk

A row's data is written and flushed before its flag, so a process killed at any point leaves
only complete rows marked done; rerunning computes exactly the missing rows.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.errors import DiffattrError, StoreMismatchError
from diffattr.fsio import atomic_write_json, read_json

COLUMNS = ("error", "residual")
FORMAT_VERSION = 1


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class FeatureStore:
    """Features of one set of samples (training set or targets) under fixed settings."""

    def __init__(self, path: Path, meta: dict[str, Any], mode: str = "r+") -> None:
        self.path = path
        self.meta = meta
        n, k = int(meta["num_rows"]), int(meta["dim"])
        self.features = np.lib.format.open_memmap(path / "features.npy", mode=mode)
        if self.features.shape != (n, k):
            raise DiffattrError(
                f"{path / 'features.npy'} has shape {self.features.shape}, expected {(n, k)}",
                hint="the store is damaged; delete it and featurize again",
            )
        self.columns = {c: np.lib.format.open_memmap(path / f"{c}.npy", mode=mode) for c in COLUMNS}
        self.done = np.lib.format.open_memmap(path / "done.npy", mode=mode)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls, path: str | Path, settings: dict[str, Any], num_rows: int, dim: int
    ) -> FeatureStore:
        """Open the store at ``path`` for ``settings``, creating it if absent.

        An existing store made with any other setting is refused, naming the field.
        """
        path = Path(path)
        meta = {
            "format_version": FORMAT_VERSION,
            "num_rows": int(num_rows),
            "dim": int(dim),
            "dtype": "float32",
            "settings": _canonical(settings),
        }
        if (path / "meta.json").is_file():
            have = read_json(path / "meta.json")
            _check_meta(have, meta, path)
            return cls(path, have, mode="r+")
        if num_rows <= 0:
            raise DiffattrError("cannot create a feature store with no rows")
        path.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(
            path / "features.npy", mode="w+", dtype=np.float32, shape=(num_rows, dim)
        ).flush()
        for c in COLUMNS:
            np.lib.format.open_memmap(
                path / f"{c}.npy", mode="w+", dtype=np.float32, shape=(num_rows,)
            ).flush()
        np.lib.format.open_memmap(
            path / "done.npy", mode="w+", dtype=np.uint8, shape=(num_rows,)
        ).flush()
        atomic_write_json(path / "meta.json", meta)  # written last: marks the store as valid
        return cls(path, meta, mode="r+")

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
        return int(np.count_nonzero(self.done))

    def is_complete(self) -> bool:
        return self.num_done == self.num_rows

    def missing_rows(self) -> np.ndarray:
        """Row indices not yet written."""
        return np.flatnonzero(self.done == 0)

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
        if not np.isfinite(features).all():
            bad = rows[~np.isfinite(features).all(axis=1)][0]
            raise DiffattrError(f"non-finite features for row {bad}; nothing was written")
        self.features[rows] = features
        for c in COLUMNS:
            if c in columns:
                self.columns[c][rows] = np.asarray(columns[c], dtype=np.float32)
        self.features.flush()
        for c in COLUMNS:
            self.columns[c].flush()
        self.done[rows] = 1
        self.done.flush()

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive advisory lock on the store (one writer process at a time)."""
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

    # ------------------------------------------------------------------ reading
    def column(self, name: str) -> np.ndarray:
        return np.asarray(self.columns[name])

    def ids(self) -> np.ndarray:
        return np.asarray(self.settings.get("ids", np.arange(self.num_rows)), dtype=np.int64)


def _check_meta(have: dict[str, Any], want: dict[str, Any], path: Path) -> None:
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
