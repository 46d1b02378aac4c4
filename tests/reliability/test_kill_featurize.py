"""SIGKILL ``diffattr featurize`` before its first row, while a row is being computed and
written, and at random delays; rerun: no half-written row ever counts as done, stale claims of
the dead process are taken over with a note, and the store ends bit-identical."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
from reliability_helpers import (
    QUIET,
    assert_same_store,
    cli_cmd,
    copy_run,
    kill_when,
    run_main,
    store_arrays,
)

ARGS = ["--timesteps", "8", "--batch-size", "2", *QUIET]


def store_of(run: Path) -> Path | None:
    found = list((run / "features").glob("train-das-*/meta.json"))
    return found[0].parent if found else None


def rows_done(run: Path) -> int:
    store = store_of(run)
    return 0 if store is None else int(np.count_nonzero(np.load(store / "done.npy")))


def check_done_rows(run: Path, clean_store: Path) -> None:
    """Every row flagged done holds exactly the clean run's data (nothing half-written)."""
    store = store_of(run)
    if store is None:
        assert not (run / "features").exists() or not any((run / "features").glob("train-*"))
        return
    got, want = store_arrays(store), store_arrays(clean_store)
    done = got["done"] != 0
    assert np.array_equal(got["done"][done], want["done"][done])
    for name in ("features", "error", "residual"):
        assert np.array_equal(got[name][done], want[name][done]), name


def test_killed_featurize_resumes_bit_identical(tiny_run, tmp_path):
    clean = copy_run(tiny_run, tmp_path / "clean")
    assert run_main("featurize", clean, *ARGS)[0] == 0
    clean_store = store_of(clean)

    run = copy_run(tiny_run, tmp_path / "killed")
    cmd = cli_cmd("featurize", run, *ARGS)
    claims = run / "features"
    kills = 0
    # 1. right after the store appears, before or during its first rows
    kills += kill_when(cmd, lambda: store_of(run) is not None)
    check_done_rows(run, clean_store)
    # 2. while a row is claimed, i.e. being computed or written
    kills += kill_when(cmd, lambda: any(claims.glob("train-*/claims/row-*")), delay=0.01)
    check_done_rows(run, clean_store)
    # 3. random small delays after some progress
    rng = random.Random(3)
    for _ in range(2):
        done = rows_done(run)
        kills += kill_when(cmd, lambda d=done: rows_done(run) > d, delay=rng.uniform(0, 0.1))
        check_done_rows(run, clean_store)
    assert kills >= 2, "the runs finished before they could be killed"

    done = np.load(store_of(run) / "done.npy") if store_of(run) else np.zeros(0)
    stale = [int(p.name[4:]) for p in claims.glob("train-*/claims/row-*")]
    code, _, err = run_main("featurize", run, *ARGS)
    assert code == 0, err
    if any(r >= done.size or done[r] == 0 for r in stale):  # taken over, and said so
        assert "no longer running" in err
    assert not list(claims.glob("train-*/claims/row-*"))
    assert_same_store(store_of(run), clean_store)


def test_store_creation_killed_midway_is_redone(tiny_run, tmp_path):
    """A store directory without meta.json (creation interrupted) is replaced, not trusted."""
    clean = copy_run(tiny_run, tmp_path / "clean")
    assert run_main("featurize", clean, *ARGS)[0] == 0
    clean_store = store_of(clean)
    run = copy_run(tiny_run, tmp_path / "run")
    half = run / "features" / clean_store.name
    half.mkdir(parents=True)
    shutil.copy(clean_store / "done.npy", half / "done.npy")  # all flags set, no meta.json
    assert run_main("featurize", run, *ARGS)[0] == 0
    assert_same_store(store_of(run), clean_store)


def test_claims_left_on_finished_rows_are_cleared(tiny_run, tmp_path):
    """A process killed between a row's done flag and releasing its claim leaves a claim on a
    finished row: the next featurize removes it, silently (nothing was taken over)."""
    run = copy_run(tiny_run, tmp_path / "run")
    assert run_main("featurize", run, *ARGS, "--rows", "0:4")[0] == 0
    claims = store_of(run) / "claims"
    claims.mkdir()
    (claims / "row-2").write_text("999999999 deadhost\n")  # done row, unlocked: owner gone
    code, _, err = run_main("featurize", run, *ARGS, "--rows", "0:4")  # nothing left to do
    assert code == 0, err
    assert not claims.exists() and "no longer running" not in err
    (claims).mkdir()
    (claims / "row-1").write_text("999999999 deadhost\n")
    (claims / "row-6").write_text("999999999 deadhost\n")  # not done: taken over
    code, _, err = run_main("featurize", run, *ARGS)
    assert code == 0, err
    assert not claims.exists()
    assert "took over rows 6 " in err and "no longer running" in err
