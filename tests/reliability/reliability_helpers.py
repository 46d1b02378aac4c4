"""Helpers of the reliability tests: CLI runners, tree snapshots, store comparison."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from diffattr.cli import main

TRAIN_ARGS = ["--train-count", "24", "--val-count", "8", "--batch-size", "8"]
QUIET = ["--quiet", "--threads", "1"]


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffattr.cli", *map(str, args)]


def run_cli(*args: str, timeout: float = 120, cwd: Path | None = None):
    """Run ``diffattr ARGS`` in a subprocess (text output)."""
    return subprocess.run(cli_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd)


def run_main(*args: str) -> tuple[int, str, str]:
    """``diffattr ARGS`` in this process: (exit code, stdout, stderr).

    An exception other than SystemExit propagates, i.e. it would be a traceback for the user.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def assert_clean_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2, stderr starting with ``error:`` and naming the culprit, no traceback."""
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    first = err.splitlines()[0] if err else ""
    assert first.startswith("error: "), err
    for needle in needles:
        assert needle in first, (needle, first)


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Relative path -> (size, sha256) of everything under ``root``; directories -> (0, "")."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            is_dir = p.is_dir() and not p.is_symlink()
            digest = "" if is_dir else hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(root))] = (0 if is_dir else st.st_size, digest)
    return out


def copy_run(src: Path, dst: Path, parts=("run.json", "train.json", "model")) -> Path:
    """A copy of a run directory with only ``parts`` (no features, scores, samples)."""
    dst.mkdir(parents=True)
    for part in parts:
        s = src / part
        if s.is_dir():
            shutil.copytree(s, dst / part)
        elif s.is_file():
            shutil.copy2(s, dst / part)
    return dst


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.005) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def store_arrays(store_dir: Path) -> dict[str, np.ndarray]:
    return {
        name: np.load(store_dir / f"{name}.npy")
        for name in ("features", "error", "residual", "done")
    }


def assert_same_store(a: Path, b: Path) -> None:
    x, y = store_arrays(a), store_arrays(b)
    for name in x:
        assert np.array_equal(x[name], y[name]), f"{name}.npy differs"


def kill_when(cmd: list[str], ready, delay: float = 0.0) -> bool:
    """Start ``cmd``, SIGKILL it once ``ready()`` (plus ``delay`` s); True if it was killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: ready() or proc.poll() is not None, timeout=90, interval=0.002)
        if delay:
            wait_for(lambda: proc.poll() is not None, timeout=delay, interval=0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    return proc.returncode == -signal.SIGKILL
