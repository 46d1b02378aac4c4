"""A small run scored by many methods through the command line: the fixture of
``tests/test_score_regression.py``.

``python tests/data/score_regression.py OUT.npz`` writes the scores it computes; the committed
``score_regression.npz`` was written so before the model-family redesign, and the test checks
that the scores of today's code equal it. One entry was rewritten since: ``journey-trak``'s,
when Journey-TRAK moved onto the featurize pipeline (its per-step gradients summed in
another order: 1.5e-5 of the largest score, every other method within 2e-7 of the old).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

METHODS = (
    "das,dtrak,trak,grad-dot,grad-cos,pixel-dot,pixel-cos,random,relative-if,"
    "renormalized-if,combine[methods=das+trak],tracin,gas,journey-trak,"
    "ensemble[include_self=true]"
)


def scores_of_a_small_run(root: Path) -> dict[str, np.ndarray]:
    """Train 30 steps on 48 digits, generate 4 images, score them; label → (4, 48) scores."""
    import torch

    from diffattr.cli import main

    torch.set_num_threads(1)
    run = str(root / "run")
    common = ["--quiet", "--threads", "1"]
    steps = ["--timesteps", "4", "--batch-size", "16"]
    assert main(["train", "--data", "digits", "--train-count", "48", "--val-count", "16",
                 "--steps", "30", "--batch-size", "16", "--checkpoint-every", "15",
                 "--out", run, *common]) == 0  # fmt: skip
    assert main(["generate", run, "--num", "4", "--steps", "10", *common]) == 0
    assert main(["score", run, "--method", METHODS, *steps, *common]) == 0
    out = {}
    for d in sorted((root / "run" / "scores").iterdir()):
        out[d.name] = np.load(d / "scores.npy")
    for kernel in ("union", "candidates"):
        argv = ["score", run, "--method", "das", "--screen", "pixel-cos:25%",
                "--screen-kernel", kernel, *steps, *common]  # fmt: skip
        assert main(argv) == 0
        scores = root / "run" / "scores" / "das-samples" / "scores.npy"
        out[f"das-screen-{kernel}"] = np.load(scores)
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(sys.argv[1], **scores_of_a_small_run(Path(tmp)))
