"""SIGKILL ``diffattr train`` at several points (one of them inside a checkpoint write), rerun:
training resumes from the last complete checkpoint and ends bit-identical to a straight run."""

from __future__ import annotations

import json
import random
from pathlib import Path

from reliability_helpers import QUIET, TRAIN_ARGS, cli_cmd, kill_when, run_main

STEPS = ["--steps", "16", "--checkpoint-every", "2"]
WEIGHTS = "diffusion_pytorch_model.safetensors"


def temp_entries(run: Path) -> list[Path]:
    """Hidden ``.NAME.*.tmp`` files or directories of atomic writes in progress."""
    return [p for p in run.rglob(".*.tmp")]


def check_consistent(run: Path) -> None:
    """What a killed run leaves: only complete checkpoints; train.json only with a model."""
    for ckpt in (run / "checkpoints").glob("step-*"):
        for part in ("state.json", "trainer.pt", f"model/{WEIGHTS}", f"ema/{WEIGHTS}"):
            assert (ckpt / part).is_file(), f"incomplete checkpoint {ckpt}: no {part}"
        json.loads((ckpt / "state.json").read_text())
    if (run / "train.json").is_file():
        assert (run / "model" / WEIGHTS).is_file()


def test_killed_training_resumes_bit_identical(tmp_path):
    clean, run = tmp_path / "clean", tmp_path / "killed"
    argv = ["train", *TRAIN_ARGS, *STEPS, *QUIET]
    assert run_main(argv[0], "--out", clean, *argv[1:])[0] == 0
    cmd = cli_cmd(argv[0], "--out", run, *argv[1:])

    kills = 0
    # 1. inside a checkpoint write: the temporary checkpoint directory exists
    kills += kill_when(cmd, lambda: bool(temp_entries(run / "checkpoints")))
    check_consistent(run)
    # 2. at random small delays once training is under way
    rng = random.Random(9)
    for _ in range(2):
        done = len(list((run / "checkpoints").glob("step-*")))
        kills += kill_when(
            cmd,
            lambda d=done: len(list((run / "checkpoints").glob("step-*"))) > d,
            delay=rng.uniform(0.0, 0.15),
        )
        check_consistent(run)
    assert kills >= 2, "the runs finished before they could be killed"

    code, _, err = run_main(argv[0], "--out", run, *argv[1:])
    assert code == 0, err
    assert (run / "model" / WEIGHTS).read_bytes() == (clean / "model" / WEIGHTS).read_bytes()
    for ckpt in (clean / "checkpoints").glob("step-*"):
        for part in ("model", "ema"):
            a = (ckpt / part / WEIGHTS).read_bytes()
            assert (run / "checkpoints" / ckpt.name / part / WEIGHTS).read_bytes() == a
    a, b = (json.loads((d / "train.json").read_text()) for d in (run, clean))
    a.pop("seconds"), b.pop("seconds")
    assert a == b
