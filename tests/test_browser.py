"""The report in a real browser: headless Chromium loads every image, sorts, renders.

Skipped when Chromium is not installed (Debian: ``apt-get install chromium``; or point
``DIFFATTR_CHROMIUM`` at a Chrome/Chromium binary). With ``DIFFATTR_ARTIFACTS`` set, the
screenshots are also copied to ``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffattr.attribution.scores import Scores
from diffattr.cli import main

pytestmark = pytest.mark.slow

TIMEOUT = 60
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def chromium(tmp_path_factory, chromium_binary) -> list[str]:
    """The headless Chromium command line (without the page), or skip with the reason."""
    binary = chromium_binary
    profile = tmp_path_factory.mktemp("chromium-profile")
    return [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # the report must need no network
        f"--user-data-dir={profile}",
    ]


def _browse(cmd: list[str], *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, f"chromium failed ({r.returncode}): {r.stderr[-2000:]}"
    return r


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny run (16 images, 3 steps), 3 targets, DAS and D-TRAK scores, and its report."""
    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("browser") / "run"
    common = ["--quiet", "--threads", "1"]
    try:
        assert main(["train", "--out", str(run), "--train-count", "16", "--val-count", "4",
                     "--steps", "3", "--batch-size", "8", *common]) == 0  # fmt: skip
        assert main(["generate", str(run), "--num", "3", "--steps", "4", *common]) == 0
        assert main(["score", str(run), "--method", "das,dtrak", "--timesteps", "1",
                     *common]) == 0  # fmt: skip
        assert main(["report", str(run), *common]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


def test_group_bars_are_drawn(chromium, run_dir):
    dom = _browse(
        chromium, "--virtual-time-budget=10000", "--dump-dom", (run_dir / "report.html").as_uri()
    ).stdout  # fmt: skip
    # digits: the classes are the built-in groups; one group view per target and method
    assert dom.count('class="gbars"') == 3 * 2 and 'class="gbar' in dom


def test_every_image_loads_and_tables_are_present(chromium, run_dir):
    dom = _browse(
        chromium, "--virtual-time-budget=10000", "--dump-dom", (run_dir / "report.html").as_uri()
    ).stdout
    ok = re.search(r'data-images-ok="(\d+)/(\d+)"', dom)
    assert ok, "the load handler did not run: " + dom[:500]
    loaded, total = int(ok.group(1)), int(ok.group(2))
    # 3 targets + per target and method 8 proponents and 4 opponents, the summary table's
    # 3 targets and top-3 per method, and the score plots (2 methods + top-1 margins).
    assert total >= 3 + 3 * 2 * (8 + 4) + 3 * (1 + 2 * 3) + 3
    assert loaded == total
    assert dom.count('<section class="target"') == 3
    assert dom.count('class="method"') == 3 * 2
    summary = dom[dom.index('id="summary-table"') :]
    summary = summary[: summary.index("</table>")]
    assert summary.count("<tr>") == 1 + 3
    assert 'id="plot-score-distributions"' in dom and 'id="plot-top1-margins"' in dom


SORT_PROBE = """<script>
window.addEventListener('load', function () {
  var table = document.getElementById('summary-table');
  var button = table.querySelectorAll('th button')[1];  // "das top-3"
  button.focus();
  var focused = document.activeElement === button && button.tabIndex >= 0;
  function order() {
    return Array.prototype.map.call(table.tBodies[0].rows, function (r) {
      return r.cells[0].getAttribute('data-sort');
    }).join(',');
  }
  button.click();
  var first = order() + ';' + button.closest('th').getAttribute('aria-sort');
  button.click();
  var second = order() + ';' + button.closest('th').getAttribute('aria-sort');
  document.body.setAttribute('data-probe', [focused, first, second].join('|'));
});
</script></body>"""


def test_summary_table_sorts_in_the_browser(chromium, run_dir, tmp_path):
    html = (run_dir / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", SORT_PROBE))
    dom = _browse(chromium, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()).stdout
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, "the probe did not run"
    focused, first, second = found.group(1).split("|")
    assert focused == "true"
    top1 = Scores.load(run_dir / "scores" / "das-samples").top_k(1)[1][:, 0]
    descending = ",".join(str(i) for i in np.argsort(-top1, kind="stable"))
    ascending = ",".join(str(i) for i in np.argsort(top1, kind="stable"))
    assert first == f"{descending};descending"
    assert second == f"{ascending};ascending"


WIDTH_PROBE = """<script>
window.addEventListener('load', function () {
  var root = document.documentElement;
  document.body.setAttribute('data-width', root.scrollWidth + '/' + window.innerWidth);
});
</script></body>"""


def test_page_fits_a_phone_screen(chromium, run_dir, tmp_path):
    """At phone width the page does not scroll sideways (wide tables scroll in their own box).

    (Headless Chromium lays out --dump-dom pages at least 500 px wide; the phone layout
    applies below 640 px.)
    """
    probe = tmp_path / "width.html"
    probe.write_text((run_dir / "report.html").read_text().replace("</body>", WIDTH_PROBE))
    dom = _browse(
        chromium, "--window-size=390,1600", "--virtual-time-budget=10000", "--dump-dom",
        probe.as_uri(),
    ).stdout  # fmt: skip
    page, window = map(int, re.search(r'data-width="(\d+)/(\d+)"', dom).groups())
    assert window < 640 and page <= window


@pytest.mark.parametrize(
    "name,size,anchor",
    [("report.png", "1200,2000", ""), ("report-phone.png", "390,1600", ""),
     ("report-full.png", "1200,6000", "")],  # down to the targets: rankings, group bars
)  # fmt: skip
def test_screenshot(chromium, run_dir, tmp_path, name, size, anchor):
    shot = tmp_path / name
    _browse(
        chromium,
        f"--screenshot={shot}",
        f"--window-size={size}",
        run_dir.joinpath("report.html").as_uri() + anchor,
    )
    assert shot.is_file() and shot.stat().st_size > 20_000
    image = Image.open(io.BytesIO(shot.read_bytes())).convert("L")
    assert image.size == tuple(int(x) for x in size.split(","))
    lo, hi = image.getextrema()
    assert hi - lo > 100  # not a blank page
    if os.environ.get("DIFFATTR_ARTIFACTS"):
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copyfile(shot, ARTIFACTS / name)


#: The training data as the Attributor records them, sized like the digits8 benchmark's (the
#: confidence bins apply to such data only).
LIKE = {"shape": [1, 8, 8], "count": 500}


@pytest.fixture(scope="module")
def sure_report(tmp_path_factory, digits) -> Path:
    """A report on a planted copy of training image 5 and an ordinary digit, with held-out
    images for the near-copy check and DAS scores concentrated for the first target."""
    from diffattr.report import write_report

    train = digits.subset(np.arange(24))
    rng = np.random.default_rng(0)
    das = rng.uniform(-1, 1, size=(2, 24))
    das[0, [5, 9]] = [12.0, 6.0]
    das[1, 17] = -1.2
    scores = {
        "das": Scores(das, train.ids.numpy(), np.array([0, 1]), "das", {"train_data": LIKE}),
        "dtrak": Scores(rng.normal(size=(2, 24)), train.ids.numpy(), np.array([0, 1]), "dtrak"),
    }
    path = tmp_path_factory.mktemp("sure") / "report.html"
    write_report(
        path, plots_dir=None, targets=torch.stack([train.images[5], digits.images[300]]),
        target_ids=np.array([0, 1]), train=train, scores=scores,
        heldout=digits.images[24:124],
    )  # fmt: skip
    return path


PANEL_PROBE = """<script>
window.addEventListener('load', function () {
  var panels = document.querySelectorAll('details.panel');
  panels.forEach(function (d) { d.open = true; });
  setTimeout(function () {  // the toggle events run, then the thumbnails load
    var svg = panels[0].querySelector('svg.hist').getBoundingClientRect();
    var rows = panels[0].querySelectorAll('tbody tr').length;
    var imgs = Array.prototype.slice.call(panels[0].querySelectorAll('tbody img'));
    var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
    var root = document.documentElement;
    document.body.setAttribute('data-probe', [panels.length, Math.round(svg.width),
      Math.round(svg.height), rows, ok, root.scrollWidth, window.innerWidth].join('|'));
  }, 500);
});
</script></body>"""


def _section(dom: str, tid: int) -> str:
    s = dom[dom.index(f'id="target-{tid}"') :]
    return s[: s.index("</section>")]


def test_confidence_opponents_and_near_copy_flag_render(chromium, sure_report):
    dom = _browse(
        chromium, "--virtual-time-budget=10000", "--dump-dom", sure_report.as_uri()
    ).stdout
    loaded, total = map(int, re.search(r'data-images-ok="(\d+)/(\d+)"', dom).groups())
    assert loaded == total > 0
    copy, ordinary = _section(dom, 0), _section(dom, 1)
    assert 'data-near-copy="true"' in copy and "nearest training image #5" in copy
    assert 'data-near-copy="false"' in ordinary and "not a near copy" in ordinary
    assert 'data-bin="high"' in copy and "high confidence" in copy
    assert 'data-bin="low"' in ordinary and "low confidence" in ordinary
    assert "Measured mean LDS of generated targets in this bin" in copy
    assert copy.count("top 4 opponents") == 2 and 'alt="opponent: training image 17' in ordinary
    assert 'id="calibration-table"' in dom


@pytest.mark.parametrize("size", ["1200,2000", "390,1600"])
def test_ranking_panel_opens_and_fits(chromium, sure_report, tmp_path, size):
    """Opened panels show the histogram and the top-20 ranking with every thumbnail loaded;
    at phone width the page still does not scroll sideways."""
    probe = tmp_path / "panel.html"
    probe.write_text(sure_report.read_text().replace("</body>", PANEL_PROBE))
    dom = _browse(
        chromium, f"--window-size={size}", "--virtual-time-budget=10000", "--dump-dom",
        probe.as_uri(),
    ).stdout  # fmt: skip
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, "the probe did not run"
    panels, width, height, rows, thumbs, page, window = map(int, found.group(1).split("|"))
    assert panels == 2 * 2 and rows == 20 and thumbs == 20  # every ranked image shown
    assert 100 < width <= 280 and height > 40
    assert page <= window


@pytest.fixture(scope="module")
def named_report(tmp_path_factory) -> tuple[Path, list[str]]:
    """A report of a run on 16 captioned digit files in a folder (3 steps), 2 targets; its
    path and the files in the folder's sorted order (the ids)."""
    from diffattr.data import load_builtin, save_png

    root = tmp_path_factory.mktemp("named")
    data, run = root / "data", root / "run"
    digits = load_builtin("digits")
    files = [f"shapes/digit-{i:02d}.png" for i in range(16)]
    for i, rel in enumerate(files):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        save_png(digits.images[i], data / rel)
    (data / "captions.txt").write_text("".join(f"{f}\ta digit\n" for f in files))
    threads = torch.get_num_threads()
    common = ["--quiet", "--threads", "1"]
    try:
        assert main(["train", "--data", str(data), "--out", str(run), "--val-count", "4",
                     "--steps", "3", "--batch-size", "4", *common]) == 0  # fmt: skip
        assert main(["generate", str(run), "--num", "2", "--steps", "2", *common]) == 0
        assert main(["score", str(run), "--method", "das", "--timesteps", "1", *common]) == 0
        assert main(["report", str(run), *common]) == 0
    finally:
        torch.set_num_threads(threads)
    return run / "report.html", files


NAMES_PROBE = """<script>
window.addEventListener('load', function () {
  var panel = document.querySelector('details.panel');
  panel.open = true;
  setTimeout(function () {
    var cells = Array.prototype.slice.call(panel.querySelectorAll('tbody td.name'));
    var shown = cells.filter(function (c) { return c.getBoundingClientRect().width > 0; });
    var tips = Array.prototype.slice.call(document.querySelectorAll('figure[title]'));
    document.body.setAttribute('data-names', shown.map(function (c) {
      return c.textContent; }).join('|'));
    document.body.setAttribute('data-tips', tips.map(function (f) {
      return f.getAttribute('title'); }).join('|'));
  }, 500);
});
</script></body>"""


def test_ranking_panel_and_hover_name_training_files(chromium, named_report, tmp_path):
    """The opened ranking panel shows each ranked training image's file and caption; the
    thumbnails' hover text names the file too."""
    report, files = named_report
    probe = tmp_path / "names.html"
    probe.write_text(report.read_text().replace("</body>", NAMES_PROBE))
    dom = _browse(
        chromium, "--window-size=1200,2000", "--virtual-time-budget=10000", "--dump-dom",
        probe.as_uri(),
    ).stdout  # fmt: skip
    found = re.search(r'data-names="([^"]*)"', dom)
    assert found, "the probe did not run"
    shown = found.group(1).split("|")
    ranked = [s for s in shown if s in files]
    assert len(ranked) == 12 and shown.count("a digit") == 12  # 16 − 4 held out, all ranked
    tips = re.search(r'data-tips="([^"]*)"', dom).group(1)
    assert any(f in tips for f in files)
