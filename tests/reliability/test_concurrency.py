"""Several featurize processes on one store: disjoint rows run side by side and give the same
store as one worker; processes on the same rows neither corrupt it nor compute a row twice,
and say what happened; a dead worker's claims are taken over."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import QUIET, assert_same_store, cli_cmd, copy_run, run_main

from diffattr.attribution.features.store import FeatureStore, RowClaims

# batch size 1: a row's bits do not depend on which rows share its batch, so any split of the
# rows between workers must reproduce the one-worker store exactly
ARGS = ["--timesteps", "16", "--batch-size", "1", *QUIET]


def store_of(run: Path) -> Path:
    return next((run / "features").glob("train-das-*"))


@pytest.fixture(scope="module")
def clean_store(tiny_run, tmp_path_factory) -> Path:
    """The store one worker makes for all 24 rows."""
    run = copy_run(tiny_run, tmp_path_factory.mktemp("one") / "run")
    assert run_main("featurize", run, *ARGS)[0] == 0
    return store_of(run)


def test_disjoint_workers_equal_one_worker(tiny_run, tmp_path, clean_store):
    run = copy_run(tiny_run, tmp_path / "run")
    procs = [
        subprocess.Popen(cli_cmd("featurize", run, *ARGS, "--rows", rows), stderr=subprocess.PIPE)
        for rows in ("0:12", "12:24")
    ]
    errs = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert not any("waiting" in e for e in errs), errs  # disjoint rows never wait
    assert_same_store(store_of(run), clean_store)
    assert not (store_of(run) / "claims").exists()


def test_workers_on_the_same_rows_share_them_and_say_so(tiny_run, tmp_path, clean_store):
    run = copy_run(tiny_run, tmp_path / "run")
    procs = [
        subprocess.Popen(cli_cmd("featurize", run, *ARGS), stderr=subprocess.PIPE) for _ in range(2)
    ]
    errs = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    # each names the other for the rows it did not compute itself
    told = [f"PID {procs[1 - i].pid}" in errs[i] for i in range(2)]
    assert any(told), errs
    for err, named in zip(errs, told, strict=True):
        assert not named or "were computed by" in err or "waiting" in err
    store = FeatureStore.load(store_of(run))
    assert store.is_complete() and not store.skipped_rows().size
    # no row computed twice or corrupted: identical to one worker
    assert_same_store(store_of(run), clean_store)


def test_dead_workers_claims_are_taken_over(tiny_run, tmp_path, clean_store):
    run = copy_run(tiny_run, tmp_path / "run")
    assert run_main("featurize", run, *ARGS, "--rows", "0:4")[0] == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    claims = store_of(run) / "claims"
    claims.mkdir()
    for row in (4, 5):
        (claims / f"row-{row}").write_text(f"{dead} somehost\n")  # unlocked: its owner is gone
    code, _, err = run_main("featurize", run, *ARGS)
    assert code == 0, err
    assert f"took over rows 4–5 of feature store {store_of(run)}, claimed by PID {dead}" in err
    assert_same_store(store_of(run), clean_store)
    assert not claims.exists()


def test_claims_exclude_each_other_and_release(tmp_path):
    a, b = RowClaims(tmp_path / "claims"), RowClaims(tmp_path / "claims")
    assert a.try_claim(3).acquired
    other = b.try_claim(3)
    assert not other.acquired and other.pid is not None
    assert b.active() == {3: other.pid}
    a.release(3)
    assert b.try_claim(3).acquired and not b.try_claim(3).stale
    b.release_all()
    assert not (tmp_path / "claims").exists()


def _open_store(path: str, queue) -> None:
    s = FeatureStore.open(path, {"features": {"measure": "das"}}, 50, 7)
    queue.put(s.created)


def test_concurrent_creation_makes_one_store(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_open_store, args=(str(tmp_path / "s"), queue)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0] * 6
    created = [queue.get(timeout=5) for _ in procs]
    assert sum(created) >= 1
    store = FeatureStore.load(tmp_path / "s", require_complete=False)
    assert store.features.shape == (50, 7) and store.num_done == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary leftovers


def test_rows_option_is_checked(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    for rows, needle in (("5:2", "--rows"), ("0:99", "outside the 24 training rows"),
                         ("a:b", "START:END")):  # fmt: skip
        code, _, err = run_main("featurize", run, *ARGS, "--rows", rows)
        assert code == 2 and err.startswith("error: ") and needle in err.splitlines()[0], err
    assert not (run / "features").exists()


def test_disjoint_rows_written_by_two_processes_directly(tmp_path):
    """Writes to different rows of the memory maps from two processes do not interfere."""
    path = tmp_path / "s"
    FeatureStore.open(path, {"features": {}}, 64, 5)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_fill, args=(str(path), parity)) for parity in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    store = FeatureStore.load(path)
    rows = np.arange(64)
    assert np.array_equal(np.asarray(store.features), np.repeat(rows[:, None], 5, 1) * 1.0)


def _fill(path: str, parity: int) -> None:
    s = FeatureStore.open(path, {"features": {}}, 64, 5)
    for r in range(parity, 64, 2):
        s.write_rows(np.array([r]), np.full((1, 5), float(r)), error=np.array([0.0]))


def test_local_process_shards_equal_one_worker(tiny_run, tmp_path, clean_store):
    """``--executor local``: two worker processes fill one shard each, bit-identical."""
    run = copy_run(tiny_run, tmp_path / "run")
    code, _, err = run_main("featurize", run, *ARGS, "--executor", "local", "--workers", "2")
    assert code == 0, err
    assert_same_store(store_of(run), clean_store)
    assert not (store_of(run) / "claims").exists()


def test_local_process_shards_under_logra_equal_one_worker(tiny_run, tmp_path):
    """The per-layer projection is rebuilt by each worker from the seed: same store."""
    logra = [*ARGS, "--projector", "logra", "--proj-dim", "4"]
    one, two = copy_run(tiny_run, tmp_path / "one"), copy_run(tiny_run, tmp_path / "two")
    assert run_main("featurize", one, *logra)[0] == 0
    code, _, err = run_main("featurize", two, *logra, "--executor", "local", "--workers", "2")
    assert code == 0, err
    assert FeatureStore.load(store_of(two)).settings["projector"]["kind"] == "logra"
    assert_same_store(store_of(two), store_of(one))


def test_score_with_gpu_workers_scores_on_the_driver_cpu(tiny_run, tmp_path, monkeypatch):
    """``score --executor local --device cuda`` on a driver without a GPU: the workers are
    asked for ``cuda``, the driver featurizes the targets and scores on the CPU. (The two
    "workers" run in this process: what is tested is the plan; real local workers are tested
    above.)"""
    import torch

    import diffattr.attribution.features.shards as shards
    import diffattr.parallel as parallel

    asked: list[str | None] = []
    real = shards.featurize_with_executor

    def on_cpu_workers(*args, device=None, **kwargs):
        asked.append(device)
        return real(*args, device="cpu", **kwargs)  # no GPU here: run the shards on the CPU

    class TwoInProcess(parallel.InProcessExecutor):
        parallelism = 2

        def __init__(self, workers, threads, progress):
            super().__init__(progress)

    monkeypatch.setattr(shards, "featurize_with_executor", on_cpu_workers)
    monkeypatch.setattr(parallel, "LocalProcessExecutor", TwoInProcess)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = copy_run(tiny_run, tmp_path / "run")
    options = ["--executor", "local", "--workers", "2", "--device", "cuda"]
    code, _, err = run_main("score", run, "--targets", "val", *ARGS, *options)
    assert code == 0, err
    assert asked == ["cuda"]
    scores = np.load(next((run / "scores").glob("das-*")) / "scores.npy")
    assert np.isfinite(scores).all() and scores.shape[1] == 24


def test_shards_redo_only_what_a_dead_worker_left(tiny_run, tmp_path, clean_store):
    """Rows done before a worker died are kept; its abandoned claims are taken over."""
    run = copy_run(tiny_run, tmp_path / "run")
    assert run_main("featurize", run, *ARGS, "--rows", "0:6")[0] == 0
    before = np.asarray(FeatureStore.load(store_of(run), require_complete=False).done).copy()
    claims = store_of(run) / "claims"
    claims.mkdir()
    (claims / "row-6").write_text("999999999 deadhost\n")  # unlocked: its owner is gone
    code, _, err = run_main("featurize", run, *ARGS, "--executor", "local", "--workers", "2")
    assert code == 0, err
    assert before[:6].all() and not before[6:].any()
    assert_same_store(store_of(run), clean_store)
    assert not claims.exists()


def test_shard_rows_cut_at_batch_multiples():
    from diffattr.attribution.features.shards import shard_rows

    pieces = shard_rows(np.arange(3, 24), 2, 4)
    assert [p.tolist() for p in pieces] == [list(range(3, 15)), list(range(15, 24))]
    assert [len(p) for p in shard_rows(np.arange(10), 4, 4)] == [4, 4, 2]
    assert shard_rows(np.arange(0), 2, 4) == []
