"""The HTML report: missing parts, plots, the sortable summary table, escaping."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffattr.attribution.scores import Scores
from diffattr.errors import DiffattrError
from diffattr.report import load_rows, png_data_uri, render_report, write_report


def _lds(method, k, v, proj=None):
    row = {
        "method": method,
        "timesteps": k,
        "val": {
            "lds": v,
            "ci_targets": [v - 0.05, v + 0.05],
            "ci_subsets_targets": [v - 0.1, v + 0.08],
            "oracle_lds": v + 0.01,
        },
        "gen": {
            "lds": v - 0.05,
            "ci_targets": [v - 0.1, v],
            "ci_subsets_targets": [v - 0.15, v + 0.02],
            "oracle_lds": v,
        },
    }
    if proj is not None:
        row["proj_dim"] = proj
    return row


LDS_ROWS = [
    _lds("das", 1, 0.3),
    _lds("das", 10, 0.35),
    _lds("dtrak", 1, 0.2),
    _lds("dtrak", 10, 0.25),
    _lds("trak", 10, 0.1, proj=512),
    _lds("trak", 10, 0.15, proj=2048),
    _lds("random", None, 0.0),
    {"method": "noise ceiling", "timesteps": None, "val": {"lds": 0.6}},
    {"method": "noise ceiling", "timesteps": None, "gen": {"lds": 0.5}},
]
CF_ROWS = [
    {"method": "das", "pixel_l2": [3.0, 4.0, 5.5, 2.0]},
    {"method": "random", "pixel_l2": [1.0, 1.5, 0.5]},
]


@pytest.fixture
def parts(small_set):
    """Targets (4 digits), the 24-image training set and random scores of two methods."""
    rng = np.random.default_rng(0)
    targets = small_set.images[:4]
    target_ids = np.array([10, 11, 12, 13])
    scores = {
        m: Scores(rng.normal(size=(4, len(small_set))), small_set.ids.numpy(), target_ids, m)
        for m in ("das", "dtrak")
    }
    return {"targets": targets, "target_ids": target_ids, "train": small_set, "scores": scores}


def _images(html: str) -> list[str]:
    return re.findall(r"src=['\"](data:image/png;base64,[^'\"]+)['\"]", html)


def _self_contained(html: str) -> None:
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html and "<script src" not in html
    srcs = re.findall(r"src=['\"]([^'\"]*)['\"]", html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)


def test_report_without_scores_or_lds_says_what_is_missing(parts, tmp_path):
    parts["scores"] = {}
    html = render_report(**parts, plots_dir=tmp_path / "plots")
    assert "No attribution scores yet" in html
    assert "No LDS results yet" in html and "--lds" in html
    assert "No counterfactual results yet" in html
    assert "Not drawn:" in html and "plot-" not in html
    assert html.count("<section class='target'") == 4
    assert len(_images(html)) == 4  # the targets only
    assert "id='summary-table'" not in html
    _self_contained(html)
    assert list((tmp_path / "plots").iterdir()) == []


def test_report_with_scores_lds_and_counterfactuals_embeds_plots(parts, tmp_path):
    plots = tmp_path / "plots"
    html = render_report(**parts, lds_rows=LDS_ROWS, counterfactual_rows=CF_ROWS, plots_dir=plots)
    _self_contained(html)
    files = sorted(p.name for p in plots.iterdir())
    assert files == sorted(
        [
            "score_distribution-das.png",
            "score_distribution-dtrak.png",
            "top1_margins.png",
            "lds-val.png",
            "lds-gen.png",
            "lds_vs_timesteps-val.png",
            "lds_vs_timesteps-gen.png",
            "lds_vs_proj_dim-val.png",
            "lds_vs_proj_dim-gen.png",
            "counterfactual.png",
        ]
    )
    for f in files:  # each file is a real PNG and is embedded as is
        png = (plots / f).read_bytes()
        w, h = Image.open(io.BytesIO(png)).size
        assert w > 200 and h > 150
        assert base64.b64encode(png).decode() in html
        assert f"data-file='{f}'" in html
    for name in ("lds", "lds-vs-timesteps", "lds-vs-proj-dim", "counterfactual", "top1-margins"):
        assert f"id='plot-{name}'" in html
    assert "Not drawn:" not in html and "No LDS results" not in html
    # The LDS table: one row per (method, K, proj dim), noise ceilings merged into one.
    table = html[html.index("id='lds-table'") :]
    table = table[: table.index("</table>")]
    assert table.count("<tr>") == 2 + 8
    assert "0.600" in table and "0.500" in table


def test_plots_missing_parts_are_listed_not_fatal(parts, tmp_path):
    rows = [
        _lds("das", 10, 0.3),  # one K only: no LDS-vs-K plot
        {"method": "dtrak", "timesteps": 10, "val": {"lds": float("nan")}},  # no finite LDS
        {"timesteps": 3},  # malformed: ignored
        "not a row",
    ]
    html = render_report(**parts, lds_rows=rows, counterfactual_rows=[{"method": "das"}])
    assert "id='plot-lds'" in html
    assert "LDS vs timesteps: needs results for at least two K" in html
    assert "Counterfactual distances: the counterfactual results hold no pixel_l2" in html
    assert "plot-lds-vs-proj-dim" not in html


def test_stale_plots_are_removed_and_default_plots_dir(parts, tmp_path):
    path = write_report(tmp_path / "report.html", **parts, lds_rows=LDS_ROWS)
    plots = tmp_path / "plots"
    assert (plots / "lds-val.png").is_file() and (plots / "top1_margins.png").is_file()
    (plots / "mine.png").write_bytes(b"kept")
    write_report(path, **parts)
    left = sorted(p.name for p in plots.iterdir())
    assert "lds-val.png" not in left and "top1_margins.png" in left and "mine.png" in left
    write_report(tmp_path / "other" / "r.html", plots_dir=None, **parts)
    assert not (tmp_path / "other" / "plots").exists()


def test_summary_table_is_sortable_by_keyboard(parts):
    html = render_report(**parts)
    table = html[html.index("id='summary-table'") :]
    table = table[: table.index("</table>")]
    heads = re.findall(r"<th [^>]*>.*?</th>", table[: table.index("</thead>")])
    assert len(heads) == 1 + 2 + 1  # target, das, dtrak, shared@10
    for th in heads:  # every header is a native button: focusable, Enter/Space activate it
        assert 'aria-sort="none"' in th and '<button type="button">' in th
    cols = [int(re.search(r'data-col="(\d+)"', th).group(1)) for th in heads]
    assert cols == [0, 1, 2, 3]
    body = table[table.index("<tbody>") :]
    assert body.count("<tr>") == 4
    # Every row: the target (sort key = id), top-3 per method (sort key = top-1 score).
    top1 = {m: s.top_k(3)[1][:, 0] for m, s in parts["scores"].items()}
    for r, row in enumerate(body.split("<tr>")[1:]):
        keys = re.findall(r"<td[^>]*data-sort='([^']*)'", row)
        assert int(keys[0]) == parts["target_ids"][r]
        assert float(keys[1]) == pytest.approx(top1["das"][r], rel=1e-5)
        assert float(keys[2]) == pytest.approx(top1["dtrak"][r], rel=1e-5)
        assert len(_images(row)) == 1 + 2 * 3
    script = html[html.index("<script>") :]
    assert "addEventListener('click'" in script and "aria-sort" in script
    assert "data-images-ok" in script
    assert "@media (max-width:640px)" in html  # phone layout
    assert "name='viewport'" in html


def test_per_target_sections_show_methods_side_by_side(parts):
    html = render_report(**parts, k_pro=5, k_opp=2)
    sections = html.split("<section class='target'")[1:]
    assert len(sections) == 4
    for s in sections:
        assert s.count("<div class='method'>") == 2
        assert s.count("top 5 proponents") == 2 and s.count("top 2 opponents") == 2
        outside = re.sub(r"<details class='groups'.*?</details>", "", s, flags=re.S)
        assert len(_images(outside)) == 1 + 2 * (5 + 2)  # the groups add their top members
        assert s.count("class='gbars'") == 2
    ids, vals = parts["scores"]["das"].top_k(5)
    assert f"#{ids[0, 0]}" in sections[0] and f"{vals[0, 0]:+.3g}" in sections[0]


def test_untrusted_text_is_escaped(parts):
    parts["scores"] = {"<b>m</b>": next(iter(parts["scores"].values()))}
    html = render_report(
        **parts,
        title="<script>x</script>",
        summary={"<i>k</i>": "<v>"},
        target_captions=["<c>"] * 4,
        lds_rows=[{**_lds("<b>m</b>", 1, 0.2)}, {**_lds("<b>m</b>", 2, 0.3)}],
    )
    assert "<script>x</script>" not in html and "&lt;script&gt;" in html
    for raw in ("<b>m</b>", "<i>k</i>", "<v>", "<c>"):
        assert raw not in html


def test_load_rows_rejects_other_json(tmp_path):
    good = tmp_path / "results.json"
    good.write_text('[{"method": "das", "timesteps": 10, "val": {"lds": 0.3}}]')
    assert load_rows(good)[0]["method"] == "das"
    bad = tmp_path / "bad.json"
    bad.write_text('{"method": "das"}')
    with pytest.raises(DiffattrError, match="bad.json"):
        load_rows(bad)


def test_extra_figures_are_embedded(tmp_path, digits):
    import numpy as np

    from diffattr.data import save_png
    from diffattr.report import render_report

    png = tmp_path / "counterfactual.png"
    save_png(digits.images[0], png, scale=4)
    html = render_report(
        targets=digits.images[:2], target_ids=np.arange(2), train=digits.subset(np.arange(5)),
        scores={}, figures=[("Counterfactual picture", png)],
    )  # fmt: skip
    assert "<figcaption>Counterfactual picture</figcaption>" in html
    assert html.count("data:image/png;base64,") >= 3  # two targets + the figure


# ---------------------------------------------------------------------------- confidence


#: The training data as the Attributor records them, sized like the digits8 benchmark's (the
#: confidence bins apply to such data only).
LIKE = {"shape": [1, 8, 8], "count": 500}


@pytest.fixture
def sure(digits):
    """A planted copy of training image 5 and an ordinary digit as targets, 24 training
    digits, 100 held-out ones; DAS scores concentrated for the first target, flat for the
    second, and D-TRAK (a second method) random."""
    train = digits.subset(np.arange(24))
    rng = np.random.default_rng(0)
    das = rng.uniform(-1, 1, size=(2, 24))
    das[0, [5, 9]] = [12.0, 6.0]
    das[1, 17] = -1.2  # target 1's strongest opponent
    scores = {
        "das": Scores(das, train.ids.numpy(), np.array([0, 1]), "das", {"train_data": LIKE}),
        "dtrak": Scores(rng.normal(size=(2, 24)), train.ids.numpy(), np.array([0, 1]), "dtrak"),
    }
    return {
        "targets": torch.stack([train.images[5].clone(), digits.images[300]]),
        "target_ids": np.array([0, 1]),
        "train": train,
        "scores": scores,
        "heldout": digits.images[24:124],
    }


def _target(html: str, tid: int) -> str:
    s = html[html.index(f"id='target-{tid}'") :]
    return s[: s.index("</section>")]


def test_report_shows_confidence_bins_with_measured_lds(sure):
    from diffattr.attribution.scores.confidence import bin_lds, method_calibration

    html = render_report(**sure)
    _self_contained(html)
    first, second = _target(html, 0), _target(html, 1)
    kappa = sure["scores"]["das"].confidence()
    entry = method_calibration("das")
    assert kappa[0] >= entry["cuts"][1] > entry["cuts"][0] > kappa[1]
    das0 = first[first.index("<h4>das</h4>") :]
    assert "data-bin='high'" in das0[: das0.index("</div>")]
    das1 = second[second.index("<h4>das</h4>") :]
    assert "data-bin='low'" in das1[: das1.index("</div>")]
    assert f"κ = {kappa[0]:.3g}" in first
    for r in bin_lds(entry, "high", "gen"):  # the benchmark's numbers for that bin, quoted
        assert f"{r['mean']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] on {r['benchmark']}" in first
    for r in bin_lds(entry, "low", "gen"):
        assert f"{r['mean']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] on {r['benchmark']}" in second
    # the calibration table, and held-out real numbers when the targets are real images
    assert "id='calibration-table'" in html and "How sure can we be?" in html
    val = render_report(**sure, target_kind="val")
    r = bin_lds(entry, "high", "val")[0]
    assert f"{r['mean']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]" in _target(val, 0)
    assert "held-out real targets in this bin" in _target(val, 0)


def test_report_flags_the_planted_copy_only(sure):
    html = render_report(**sure)
    assert "data-near-copy='true'" in _target(html, 0)
    assert "data-near-copy='false'" in _target(html, 1)
    assert "nearest training image #5" in _target(html, 0)
    assert "5% quantile of held-out real images" in _target(html, 0)
    summary = html[html.index("id='summary-table'") :]
    rows = summary[: summary.index("</table>")].split("<tr>")[2:]
    assert "near copy" in rows[0] and "near copy" not in rows[1]
    assert "No near-copy check" not in html


def test_report_without_heldout_uses_the_flag_in_the_scores_or_says_it_is_missing(sure):
    from diffattr.attribution.scores.confidence import near_copies

    heldout = sure.pop("heldout")
    html = render_report(**sure)
    assert "No near-copy check" in html and "data-near-copy" not in html
    sure["scores"]["dtrak"].set_near_copies(
        near_copies(sure["targets"], sure["train"].images, heldout)
    )
    html = render_report(**sure)
    assert "data-near-copy='true'" in _target(html, 0)
    assert "data-near-copy='false'" in _target(html, 1)


def test_report_shows_opponents_and_an_expandable_ranking(sure):
    html = render_report(**sure, k_opp=2, k_ranking=20)
    second = _target(html, 1)
    das = second[second.index("<h4>das</h4>") :]
    opp = das[das.index("top 2 opponents") :]
    grid = opp[opp.index("<div class='grid'>") :]
    grid = grid[: grid.index("</div>")]
    opponents = re.findall(r'alt="opponent: training image (\d+), score ([^"]+)"', grid)
    assert len(opponents) == 2 and opponents[0] == ("17", "-1.2")  # the most negative first
    panels = re.findall(r"<details class='panel'>.*?</details>", html, flags=re.S)
    assert len(panels) == 2 * 2  # targets × methods
    for p in panels:
        assert "top 20 of 24 scored training images" in p
        body = p[p.index("<tbody>") :]
        assert body.count("<tr>") == 20
        assert "<svg class='hist'" in p and ">training images</text>" in p and ">score</text>" in p
    first_das = panels[0]
    ranked = re.findall(r"<td class='num'>#(\d+)</td>", first_das)
    assert ranked[:2] == ["5", "9"]  # the planted spikes, in order
    assert re.findall(r"data-thumb='(\d+)'", first_das) == ranked
    # each ranked image is embedded once, in the shared map the panels' script reads
    found = re.search(r"<script type='application/json' id='thumbs'>(.*?)</script>", html)
    thumbs = json.loads(found.group(1))
    assert set(thumbs) == set(re.findall(r"data-thumb='(\d+)'", html))
    train = sure["train"]
    pos = int(np.flatnonzero(train.ids.numpy() == 5)[0])
    assert thumbs["5"] == png_data_uri(train.images[pos])
    assert "fillThumbs" in html[html.rindex("<script>") :]


def test_histogram_counts_every_finite_score():
    from diffattr.report import histogram_svg

    svg = histogram_svg(np.r_[np.linspace(-1, 2, 30), np.nan], bins=3)
    assert "30 values from -1 to 2" in svg
    heights = [float(h) for h in re.findall(r"height='([\d.]+)'", svg)]
    assert len(heights) == 3 and max(heights) > 0
    assert histogram_svg(np.array([np.nan])) == ""
