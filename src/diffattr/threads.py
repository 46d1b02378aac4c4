"""CPU threads on a machine that may be doing something else.

PyTorch starts one OpenMP thread per core. Beside another busy process those threads fight
for the same cores and, while they wait for each other, spin: beside one busy 2-thread process
on 2 cores a training step of the ``tiny`` UNet took 6.9× and featurizing 6.0× as long as
alone (benchmarks/results/shared-machine.md). So a command that is not told ``--threads N``
counts the cores other processes keep busy (from ``/proc/stat`` over a short interval) and
uses the rest, at least one: 1.8× and 2.2× there. OpenMP's passive wait policy was measured
too and is not set: it slowed two threads alone by 2.4× on training.

``DIFFATTR_THREADS=N`` in the environment fixes the count for every command that is not given
``--threads`` (a shared machine with a known share, or reproducible runs: training is
bit-reproducible only at the same thread count).
"""

from __future__ import annotations

import os
import time

from diffattr.errors import ConfigError

#: Environment variable that fixes the thread count of commands not given ``--threads``.
THREADS_ENV = "DIFFATTR_THREADS"

#: How long the load of the other processes is sampled at start, in seconds.
SAMPLE_SECONDS = 0.15


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from ``/proc/stat``, or None where it is missing."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def busy_cores(interval: float = SAMPLE_SECONDS) -> float:
    """How many cores' worth of CPU other processes use now (0 where it cannot be read).

    busy = (Δ busy jiffies / Δ total jiffies) × cores, sampled over ``interval`` while this
    process sleeps, so its own work is not counted.
    """
    first = _cpu_times()
    if first is None:
        return 0.0
    time.sleep(interval)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return 0.0
    share = (second[0] - first[0]) / (second[1] - first[1])
    return max(0.0, share) * (os.cpu_count() or 1)


def threads_from_environment() -> int | None:
    """``$DIFFATTR_THREADS`` as a positive integer, None where unset or empty."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(
            f"{THREADS_ENV}={value!r} is not a positive whole number",
            hint=f"set it to the CPU threads to use (e.g. {THREADS_ENV}=1) or unset it",
        )
    return int(value)


def choose_threads(requested: int | None = None) -> int:
    """``requested``, else ``$DIFFATTR_THREADS``, else the usable cores less those other
    processes keep busy, at least 1.

    A core counts as taken when other processes use more than half of it.
    """
    if requested is not None:
        return int(requested)
    from_env = threads_from_environment()
    if from_env is not None:
        return from_env
    return max(1, usable_cores() - int(busy_cores() + 0.5))


def configure_threads(requested: int | None = None) -> int:
    """Set torch's and the BLAS libraries' thread counts to :func:`choose_threads`; return it."""
    import torch

    n = choose_threads(requested)
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - comes with scikit-learn
        return n
    threadpool_limits(limits=n)
    return n
