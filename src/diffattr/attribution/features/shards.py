"""Featurize a run's training set in shards on an executor (local processes or Ray).

The rows still missing from the store are cut into one contiguous shard per worker, at
multiples of the batch size, so every batch holds the same rows as in one process and the
store ends bit-identical to an in-process run (same device and thread count). Each worker loads
the run's model and data once (cached across its shards) and writes its rows into the shared
memory-mapped store under row claims (:mod:`.store`). A worker that dies
leaves its finished rows flagged done and its claims unlocked: the retried shard (Ray's
``max_retries``) or a rerun takes the claims over and computes only the rows left.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.attribution.features.featurize import FeatureSettings
from diffattr.attribution.features.store import FeatureStore
from diffattr.parallel import Executor


@dataclass(frozen=True)
class ShardJob:
    """One worker's rows of one run's training features; picklable."""

    run: str
    method: str
    settings: dict[str, Any]
    rows: tuple[int, ...]
    #: ``loader(run) -> (model, training set, schedule)``, a module-level function (picklable)
    loader: Callable[[str], tuple[Any, Any, Any]]
    batch_size: int = 32
    device: str = "cpu"
    on_nonfinite: str = "stop"
    options: dict[str, Any] = field(default_factory=dict)


#: (run path, model files' mtimes) -> (model, training set, schedule), per worker process
_LOADED: dict[tuple[str, tuple[int, ...]], tuple[Any, Any, Any]] = {}


def _load_run(job: ShardJob):
    """The run's model, training set and schedule, loaded once per worker process."""
    from diffattr.run import RunDir

    run = RunDir(job.run)
    stamps = tuple(p.stat().st_mtime_ns for p in sorted(run.model_dir.glob("*")))
    key = (str(Path(job.run).resolve()), stamps)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = job.loader(job.run)
    return _LOADED[key]


def featurize_shard(job: ShardJob) -> int:
    """Compute the job's rows that are still missing; the number of rows it was given."""
    from diffattr.attribution.attributor import Attributor
    from diffattr.run import RunDir

    model, train_set, schedule = _load_run(job)
    att = Attributor(
        model,
        train_set,
        RunDir(job.run).features_dir,
        method=job.method,
        schedule=schedule,
        settings=FeatureSettings(**job.settings),
        batch_size=job.batch_size,
        device=job.device,
        progress=False,
        on_nonfinite=job.on_nonfinite,
        options=job.options,
    )
    att.featurize(np.asarray(job.rows, dtype=np.int64))
    return len(job.rows)


def shard_rows(todo: np.ndarray, shards: int, batch_size: int) -> list[np.ndarray]:
    """``todo`` cut into at most ``shards`` contiguous pieces at multiples of ``batch_size``."""
    todo = np.asarray(todo, dtype=np.int64)
    batches = math.ceil(todo.size / batch_size)
    per = max(1, math.ceil(batches / max(1, shards))) * batch_size
    return [todo[s : s + per] for s in range(0, todo.size, per)]


def featurize_with_executor(
    attributor,
    run: str | Path,
    method: str,
    executor: Executor,
    loader: Callable[[str], tuple[Any, Any, Any]],
    rows: np.ndarray | None = None,
    options: dict[str, Any] | None = None,
    device: str | None = None,
) -> FeatureStore:
    """Fill ``attributor``'s training store (or its ``rows``) with shards run on ``executor``.

    ``attributor`` is the main process's :class:`Attributor` for ``run`` made with ``method``
    and ``options`` (it names the store and the settings); workers rebuild it from those and
    ``loader(run)`` (the run's model, training set and schedule, by its family), on
    ``device`` (default: the attributor's; e.g. ``cuda`` on Ray GPU workers of a CPU driver).
    """
    path = attributor.train_store_path
    todo = np.arange(len(attributor.train)) if rows is None else np.asarray(rows, np.int64)
    if (path / "meta.json").is_file():
        todo = np.intersect1d(FeatureStore.load(path, require_complete=False).missing_rows(), todo)
    template = ShardJob(
        run=str(run),
        method=method,
        settings=attributor.settings.to_dict(),
        rows=(),
        loader=loader,
        batch_size=attributor.batch_size,
        device=device or attributor.device,
        on_nonfinite=attributor.on_nonfinite,
        options=dict(options or {}),
    )
    if todo.size:
        executor.start()  # a Ray cluster's size decides the number of shards
        jobs = [
            replace(template, rows=tuple(int(r) for r in piece))
            for piece in shard_rows(todo, executor.parallelism, attributor.batch_size)
        ]
        desc = f"featurize train ({attributor.settings.measure}, {len(jobs)} shards)"
        list(executor.map(featurize_shard, jobs, desc=desc))
    return FeatureStore.load(path, require_complete=False)
