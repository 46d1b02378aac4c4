"""attribution.scores.groups: group scores (sums, shares, strongest members), the groups file
(by id or file, errors naming the line), and `score`/`report` with groups."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffattr.attribution.scores import Scores
from diffattr.attribution.scores.groups import NO_GROUP, group_scores, read_groups
from diffattr.attribution.scores.names import Names
from diffattr.cli import main
from diffattr.errors import DataError

NAMES = Names(np.array([10, 11, 12, 13]), ["a.png", "b.png", "sub/c.png", "d.png"])


def test_group_scores_are_sums_with_signed_shares_and_strongest_members():
    values = np.array([[3.0, -1.0, 2.0, np.nan], [0.0, 0.0, 0.0, 0.0]])
    g = group_scores(values, np.array([10, 11, 12, 13]), {10: "x", 11: "x", 12: "y"}, True)
    assert g.groups == ["x", "y", NO_GROUP] and g.sizes == [2, 1, 1]
    np.testing.assert_allclose(g.values[0], [2.0, 2.0, 0.0])  # NaN (unscored) counts 0
    np.testing.assert_allclose(g.shares[0], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(g.shares[1], [0.0, 0.0, 0.0])  # nothing to share
    assert g.top_members[0][0] == [(10, 3.0), (11, -1.0)]
    rows = g.rows()[0]
    assert [r["group"] for r in rows][:2] == ["x", "y"] and rows[0]["size"] == 2
    assert "estimated change" in g.meaning()
    means = group_scores(values, np.array([10, 11, 12, 13]), {10: "x", 11: "x", 12: "y"}, False)
    assert "mean" in means.meaning() and "not an estimated effect" in means.meaning()
    np.testing.assert_allclose(means.values[0], [1.0, 2.0, 0.0])  # (3 − 1)/2; 2; none scored


def test_groups_files_name_images_by_id_or_file(tmp_path):
    csv_file = tmp_path / "g.csv"
    csv_file.write_text("image,group\n10,cats\nsub/c.png,dogs\n\n")
    assert read_groups(csv_file, NAMES) == {10: "cats", 12: "dogs"}
    js = tmp_path / "g.json"
    js.write_text(json.dumps({"b.png": "cats", "13": "dogs"}))
    assert read_groups(js, NAMES) == {11: "cats", 13: "dogs"}


@pytest.mark.parametrize(
    "text,needle",
    [("10,cats\n99,dogs\n", "line 2: '99' is neither"),
     ("10,cats,extra\n", "line 1: expected two columns"),
     ("10,\n", "line 1: the group must be a non-empty name"),
     ("nothere.png,cats\n", "'nothere.png' is neither")],
)  # fmt: skip
def test_a_bad_groups_file_is_refused_naming_the_line(tmp_path, text, needle):
    f = tmp_path / "g.csv"
    f.write_text(text)
    with pytest.raises(DataError, match=needle):
        read_groups(f, NAMES)


def test_scores_group_by_the_training_sets_own_labels():
    names = Names(np.array([0, 1, 2]), None, None, ["one", "two", "one"])
    s = Scores(np.array([[1.0, 2.0, 4.0]]), np.array([0, 1, 2]), np.array([0]), "das",
               train_names=names)  # fmt: skip
    g = s.by_group()
    assert g.groups == ["one", "two"] and g.additive
    np.testing.assert_allclose(g.values, [[5.0, 2.0]])
    assert Scores(np.zeros((1, 3)), np.arange(3), np.array([0]), "pixel-cos").by_group() is None


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_tiny_run):
    return make_tiny_run(tmp_path_factory.mktemp("groups") / "run", samples=0)


def test_a_copy_of_a_group_a_image_credits_group_a(run, tmp_path, capsys):
    train, _ = run.data_spec().load()
    ids = train.ids.numpy()
    half = len(ids) // 2
    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f"{i},{'A' if p < half else 'B'}\n" for p, i in enumerate(ids)))
    targets = tmp_path / "copy.npz"
    np.savez(targets, images=train.images[1:2].numpy())  # a copy of an A image
    opts = ["--timesteps", "4", "--groups", str(labels), "--json", "--quiet"]
    assert main(["score", str(run.path), "--method", "das", "--targets", str(targets), *opts]) == 0
    rows = json.loads(capsys.readouterr().out)["targets"][0]["das"]["groups"]
    by_name = {r["group"]: r for r in rows}
    assert by_name["A"]["score"] > by_name["B"]["score"]
    assert rows[0]["group"] == "A" and rows[0]["top_members"][0]["train_id"] == int(ids[1])
    saved = json.loads((run.scores_dir / "das-copy" / "groups.json").read_text())
    assert saved["targets"][0]["groups"][0]["group"] == "A"
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{ids[0]},A\n123456,B\n")
    assert main(["score", str(run.path), "--targets", str(targets), "--timesteps", "4",
                 "--groups", str(bad), "--quiet"]) == 2  # fmt: skip
    assert "bad.csv, line 2: '123456' is neither" in capsys.readouterr().err


def test_the_report_shows_group_bars(run, tmp_path):
    assert main(["generate", str(run.path), "--num", "2", "--steps", "4", "--quiet"]) == 0
    assert main(["score", str(run.path), "--method", "das", "--timesteps", "4", "--quiet"]) == 0
    assert main(["report", str(run.path), "--quiet"]) == 0  # digits: classes by default
    html = run.report_path.read_text()
    assert html.count("class='gbars'") == 2 and "strongest members of" in html
    assert main(["report", str(run.path), "--groups", "none", "--quiet"]) == 0
    assert "class='gbars'" not in run.report_path.read_text()
