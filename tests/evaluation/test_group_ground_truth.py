"""evaluation.groups: leave-one-group-out ground truth (retraining as the LDS does) and the
agreement of group scores with it."""

from __future__ import annotations

import numpy as np

from diffattr.cli import main
from diffattr.evaluation.groups import (
    build_group_truth,
    evaluate_groups,
    format_group_table,
    group_agreement,
    group_positions,
    measured_effects,
)
from diffattr.parallel import make_executor
from diffattr.run import RunDir


def test_positions_and_agreement_of_a_perfect_and_a_reversed_prediction():
    ids = np.array([5, 6, 7, 8, 9])
    assert {g: p.tolist() for g, p in group_positions(ids, {5: "a", 7: "a", 8: "b"}).items()} == {
        "a": [0, 2], "b": [3]}  # fmt: skip
    groups = {"a": [5, 6], "b": [7], "c": [8, 9]}
    scores = np.array([[1.0, 1.0, 0.5, 0.0, 0.1], [0.0, 0.0, 0.5, 2.0, 2.0]])  # sums a, b, c
    effects = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    rho, top = group_agreement(scores, ids, groups, effects)
    np.testing.assert_allclose(rho, [1.0, 1.0])
    assert top.tolist() == [True, True]
    rho, top = group_agreement(scores, ids, groups, -effects)
    np.testing.assert_allclose(rho, [-1.0, -1.0])
    assert top.tolist() == [False, False]


def test_a_tiny_group_benchmark_end_to_end(tmp_path):
    run = tmp_path / "run"
    quiet = ["--quiet", "--threads", "1"]
    assert main(["train", "--out", str(run), "--train-count", "16", "--val-count", "3",
                 "--steps", "3", "--batch-size", "8", *quiet]) == 0  # fmt: skip
    bench = tmp_path / "bench"
    assert main(["lds", "build", str(run), "--out", str(bench), "--subsets", "2", "--seeds", "0",
                 "--measure-timesteps", "4", "--num-val", "3", "--num-gen", "2",
                 "--executor", "inprocess", "--quiet", "--threads", "1"]) == 0  # fmt: skip
    train, _ = RunDir(run).data_spec().load()
    ids = train.ids.numpy()
    assignment = {int(i): ("even" if p % 2 == 0 else "odd") for p, i in enumerate(ids)}
    out = tmp_path / "groups"
    with make_executor("inprocess", progress=False) as ex:
        build_group_truth(RunDir(run), bench, out, assignment, [0], ex)
    models = sorted(p.name for p in (out / "models").iterdir())
    assert models == ["seed0-all", "seed0-group001-even", "seed0-group002-odd"]
    groups, effects = measured_effects(out)
    assert groups == ["even", "odd"] and effects.shape == (5, 2) and np.isfinite(effects).all()
    with make_executor("inprocess", progress=False) as ex:  # finished: nothing retrained
        build_group_truth(RunDir(run), bench, out, assignment, [0], ex)
    rows = evaluate_groups(out, RunDir(run), [("das", {}), ("random", {})], 1, False, 20)
    assert [r["method"] for r in rows] == ["das", "random"]
    assert -1 <= rows[0]["val"]["spearman"] <= 1 and 0 <= rows[0]["gen"]["top1"] <= 1
    assert "top-1 0.50 (2 groups)" in format_group_table(rows, 2)
