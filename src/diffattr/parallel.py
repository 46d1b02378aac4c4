"""One executor interface for independent jobs: in-process, local worker processes, or Ray.

Jobs are picklable callables with picklable arguments; results come back in submission order.
Workers each run with ``threads`` torch (and BLAS) threads: two 1-thread workers use a 2-core
machine better than one 2-thread process.

Ray (``RayExecutor``): starts a local runtime with one CPU per worker, or joins an existing
cluster (``address``); each job is a Ray task with ``cpus_per_task`` CPUs and
``gpus_per_task`` GPUs. A task whose worker dies is retried (``max_retries``), so a lost
worker's job is simply redone; jobs are written to resume (training checkpoints, feature-store
row flags), so a retry only redoes what was not finished. Exceptions the job raises are not
retried and reach the caller as themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, TypeVar

from tqdm.auto import tqdm

from diffattr.errors import ConfigError, DiffattrError

T = TypeVar("T")

EXECUTORS = ("inprocess", "local", "ray")
#: Work expected to take longer than this (seconds) is announced with its estimate.
ESTIMATE_AFTER = 60.0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class ProgressBar(tqdm):
    """A progress bar that, after its first update, says once how long the whole work will
    take when that is more than :data:`ESTIMATE_AFTER` seconds: elapsed × total / done.

    The note goes to stderr even where the bar cannot draw (a log file), so a long featurize
    or LDS build says what to expect from its first measured batch; not when disabled
    (``--quiet``).
    """

    def update(self, n: float | None = 1) -> bool | None:
        out = super().update(n)
        if not getattr(self, "_estimated", False) and not self.disable and self.n:
            self._estimated = True
            elapsed = self.format_dict["elapsed"]
            total = self.total or 0
            whole = elapsed * total / self.n
            if total > self.n and whole > ESTIMATE_AFTER:
                from diffattr.errors import notice

                notice(
                    f"{self.desc or 'work'}: about {_duration(whole)} in all, judged from the "
                    f"first {self.n:g} of {total:g} ({_duration(elapsed)})"
                )
        return out


class Executor(ABC):
    """Runs ``fn(job)`` for every job. Use as a context manager to release its workers."""

    #: jobs that run at once (how many shards to cut work into)
    parallelism: int = 1

    @abstractmethod
    def map(self, fn: Callable[[Any], T], jobs: Iterable[Any], desc: str = "") -> Iterator[T]:
        """Results of ``fn`` over ``jobs``, in order."""

    def run_pending(
        self,
        fn: Callable[[Any], T],
        jobs: list[Any],
        finished: Callable[[Any], bool],
        desc: str = "",
    ) -> int:
        """Run ``fn`` over the jobs not yet ``finished`` (work a killed run left done is not
        handed to workers, so the progress bar and its time estimate count only what is
        left); say how many were done already. Returns the number run."""
        pending = [job for job in jobs if not finished(job)]
        if len(pending) < len(jobs):
            from diffattr.errors import notice

            notice(f"{desc or 'work'}: {len(jobs) - len(pending)} of {len(jobs)} already done")
        if pending:
            list(self.map(fn, pending, desc=desc))
        return len(pending)

    def start(self) -> Executor:
        """Acquire workers now, so :attr:`parallelism` is known (map does it when needed)."""
        return self

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the executor started (nothing by default)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessExecutor(Executor):
    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def map(self, fn, jobs, desc=""):
        jobs = list(jobs)
        with ProgressBar(total=len(jobs), desc=desc, disable=not self.progress or not desc) as bar:
            for job in jobs:
                yield fn(job)
                bar.update(1)


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
        self.parallelism = workers

    def map(self, fn, jobs, desc=""):
        jobs = list(jobs)
        ctx = get_context("spawn")
        with ProcessPoolExecutor(
            self.workers, mp_context=ctx, initializer=_init_worker, initargs=(self.threads,)
        ) as pool:
            futures = [pool.submit(fn, job) for job in jobs]
            bar = ProgressBar(total=len(futures), desc=desc, disable=not self.progress or not desc)
            for f in futures:
                result = f.result()
                bar.update(1)
                yield result
            bar.close()


def _ray_task(fn: Callable[[Any], T], job: Any, threads: int) -> T:
    """Body of every Ray task: limit threads like a local worker, then run the job."""
    _init_worker(threads)
    return fn(job)


class RayExecutor(Executor):
    """Jobs as Ray tasks, on a local runtime (``workers`` CPUs) or an existing cluster.

    ``address``: a cluster to join (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); None
    starts a local runtime that runs ``workers`` tasks at once (``workers`` × ``cpus_per_task``
    CPUs; default: the machine's cores), shut down by :meth:`close`. A runtime already
    initialised in this process is used as it is.
    Workers must be able to import ``diffattr`` (and read the run directories: a shared disk).
    """

    def __init__(
        self,
        workers: int | None = None,
        address: str | None = None,
        cpus_per_task: float = 1.0,
        gpus_per_task: float = 0.0,
        max_retries: int = 3,
        progress: bool = True,
    ) -> None:
        if workers is not None and workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        if cpus_per_task <= 0 or gpus_per_task < 0:
            raise ConfigError(
                f"--ray-cpus-per-task must be > 0 and --ray-gpus-per-task >= 0, got "
                f"{cpus_per_task} and {gpus_per_task}"
            )
        if max_retries < 0:
            raise ConfigError(f"Ray max_retries must be >= 0, got {max_retries}")
        self.workers, self.address = workers, address
        self.cpus_per_task, self.gpus_per_task = cpus_per_task, gpus_per_task
        self.max_retries, self.progress = max_retries, progress
        self.threads = max(1, int(cpus_per_task))
        self.parallelism = workers or os.cpu_count() or 1
        self._started = False

    def _ray(self):
        try:
            import ray
        except ImportError as exc:
            raise ConfigError(
                "--executor ray needs the ray package",
                hint="pip install 'diffattr[ray]', or use --executor local",
            ) from exc
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
            try:
                if self.address:
                    ray.init(address=self.address, **kwargs)
                else:
                    cpus = math.ceil(self.parallelism * self.cpus_per_task)  # N tasks at once
                    ray.init(num_cpus=cpus, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.address or "a local runtime"
                raise DiffattrError(
                    f"cannot start Ray ({where}): {exc}",
                    hint="check --ray-address (a running cluster's head), or drop it to start "
                    "a local runtime",
                ) from exc
            self._started = True
        if self.address and self.workers is None:
            cpus = ray.cluster_resources().get("CPU", 1)
            self.parallelism = max(1, int(cpus // self.cpus_per_task))
        return ray

    def start(self) -> RayExecutor:
        """Connect now (map does it on first use); sets :attr:`parallelism` for a cluster."""
        self._ray()
        return self

    def map(self, fn, jobs, desc=""):
        jobs = list(jobs)
        ray = self._ray()
        task = ray.remote(_ray_task).options(
            num_cpus=self.cpus_per_task,
            num_gpus=self.gpus_per_task,
            max_retries=self.max_retries,
            retry_exceptions=False,
        )
        refs = [task.remote(fn, job, self.threads) for job in jobs]
        bar = tqdm(total=len(refs), desc=desc, disable=not self.progress or not desc)
        # On an error the remaining tasks are left to finish (their work is resumable) rather
        # than cancelled: cancelling tasks that are completing at that moment can trip a fatal
        # check in Ray's task manager (2.60) that ends the driver process. A runtime this
        # executor started is shut down by close(), which stops them anyway.
        try:
            for ref in refs:
                yield _ray_result(ray, ref, self.max_retries)
                bar.update(1)
        finally:
            bar.close()

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def _ray_result(ray, ref, retries: int):
    """``ray.get(ref)``; a job's own exception is re-raised as itself (one line in the CLI)."""
    from ray.exceptions import RayTaskError, WorkerCrashedError

    try:
        return ray.get(ref)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise
    except WorkerCrashedError as exc:
        raise DiffattrError(
            f"a Ray worker died {retries + 1} times running one job",
            hint="rerun the same command: finished work is kept and resumes",
        ) from exc


def make_executor(
    kind: str = "local",
    workers: int | None = None,
    progress: bool = True,
    address: str | None = None,
    cpus_per_task: float = 1.0,
    gpus_per_task: float = 0.0,
) -> Executor:
    """``inprocess``, ``local`` (default: one 1-thread worker per CPU core) or ``ray``."""
    if kind == "inprocess":
        return InProcessExecutor(progress)
    if kind == "local":
        return LocalProcessExecutor(workers or os.cpu_count() or 1, 1, progress)
    if kind == "ray":
        return RayExecutor(workers, address, cpus_per_task, gpus_per_task, progress=progress)
    raise ConfigError(f"unknown executor {kind!r}", hint=f"use {', '.join(EXECUTORS)}")


def add_executor_args(p: argparse.ArgumentParser, default: str = "local") -> None:
    """``--executor``, ``--workers`` and the Ray options of a command."""
    g = p.add_argument_group("parallel execution")
    g.add_argument(
        "--executor",
        choices=list(EXECUTORS),
        default=default,
        help=f"where jobs run: this process, local worker processes, or Ray (default: {default})",
    )
    g.add_argument(
        "--workers", type=int, default=None, help="parallel workers (default: CPU cores)"
    )
    g.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="join this Ray cluster (e.g. auto, ray://head:10001) instead of starting a local "
        "runtime that runs --workers tasks at once",
    )
    g.add_argument(
        "--ray-cpus-per-task", type=float, default=1.0, help="CPUs per Ray task (default: 1)"
    )
    g.add_argument(
        "--ray-gpus-per-task", type=float, default=0.0, help="GPUs per Ray task (default: 0)"
    )


def executor_from_args(args: argparse.Namespace) -> Executor:
    """The executor that :func:`add_executor_args` options describe."""
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if getattr(args, "ray_address", None) and args.executor != "ray":
        raise ConfigError("--ray-address needs --executor ray")
    return make_executor(
        args.executor,
        args.workers,
        progress=not args.quiet,
        address=getattr(args, "ray_address", None),
        cpus_per_task=getattr(args, "ray_cpus_per_task", 1.0),
        gpus_per_task=getattr(args, "ray_gpus_per_task", 0.0),
    )


def workers_from_args(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """A context giving the executor the options describe, or None for ``--executor
    inprocess`` (the caller then does the work itself, in this process)."""
    if getattr(args, "executor", "inprocess") == "inprocess":
        return contextlib.nullcontext()
    return executor_from_args(args)
