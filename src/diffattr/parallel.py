"""One executor interface for independent jobs: in-process or local worker processes.

Jobs are picklable callables with picklable arguments; results come back in submission order.
Local workers each run with ``threads`` torch threads (two 1-thread workers use a 2-core
machine better than one 2-thread process).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, TypeVar

from tqdm.auto import tqdm

from diffattr.errors import ConfigError

T = TypeVar("T")


class Executor(ABC):
    """Runs ``fn(job)`` for every job."""

    @abstractmethod
    def map(self, fn: Callable[[Any], T], jobs: Iterable[Any], desc: str = "") -> Iterator[T]:
        """Results of ``fn`` over ``jobs``, in order."""


class InProcessExecutor(Executor):
    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def map(self, fn, jobs, desc=""):
        jobs = list(jobs)
        for job in tqdm(jobs, desc=desc, disable=not self.progress or not desc):
            yield fn(job)


def _init_worker(threads: int) -> None:
    """Limit torch and the BLAS libraries (NumPy/SciPy) of a worker to ``threads`` threads."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)


class LocalProcessExecutor(Executor):
    """``workers`` spawned processes with ``threads`` torch threads each."""

    def __init__(self, workers: int = 2, threads: int = 1, progress: bool = True) -> None:
        if workers < 1 or threads < 1:
            raise ConfigError("--workers and --threads-per-worker must be at least 1")
        self.workers, self.threads, self.progress = workers, threads, progress

    def map(self, fn, jobs, desc=""):
        jobs = list(jobs)
        ctx = get_context("spawn")
        with ProcessPoolExecutor(
            self.workers, mp_context=ctx, initializer=_init_worker, initargs=(self.threads,)
        ) as pool:
            futures = [pool.submit(fn, job) for job in jobs]
            bar = tqdm(total=len(futures), desc=desc, disable=not self.progress or not desc)
            for f in futures:
                result = f.result()
                bar.update(1)
                yield result
            bar.close()


def make_executor(kind: str = "local", workers: int | None = None, progress: bool = True):
    """``inprocess`` or ``local`` (default: one 1-thread worker per CPU core)."""
    if kind == "inprocess":
        return InProcessExecutor(progress)
    if kind == "local":
        return LocalProcessExecutor(workers or os.cpu_count() or 1, 1, progress)
    raise ConfigError(f"unknown executor {kind!r}", hint="use local or inprocess")
