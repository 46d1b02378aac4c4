"""families.index: an index answers exactly what `diffattr score` answers, is reused only for
the same inputs, never changes the run when queried, and refuses what it cannot serve."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from diffattr.attribution.features.featurize import FeatureSettings
from diffattr.cli import main
from diffattr.errors import ConfigError, DiffattrError
from diffattr.families import open_run

FEATURES = ["--timesteps", "2", "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_tiny_run):
    return make_tiny_run(tmp_path_factory.mktemp("index") / "run", samples=3)


def tree_state(path) -> dict[str, tuple[str, int]]:
    """Every file under ``path``: its sha256 and modification time."""
    return {
        str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("method", ["das", "pixel-cos"])
def test_query_equals_score(run, method, capsys):
    assert main(["score", str(run.path), "--method", method, *FEATURES]) == 0
    saved = run.scores_dir / f"{method}-samples"
    want_rows = json.loads((saved / "topk.json").read_text())
    assert main(["score", str(run.path), "--method", method, *FEATURES, "--json"]) == 0
    want_targets = json.loads(capsys.readouterr().out)["targets"]
    assert main(["query", str(run.path), "samples", "--method", method, "--build", *FEATURES,
                 "--json"]) == 0  # fmt: skip
    got = json.loads(capsys.readouterr().out)["queries"][0]
    assert got["targets"] == want_targets  # near-copy flags, κ, percentiles, bins
    assert got["answers"] == want_rows  # top-k ids, scores, names
    index = open_run(run).index(method, settings=FeatureSettings(timesteps=2), build=False,
                                progress=False)  # fmt: skip
    np.testing.assert_allclose(
        index.score("samples").values, np.load(saved / "scores.npy"), rtol=1e-6
    )


def test_queries_change_nothing_in_the_run_and_reuse_the_index(run, tmp_path):
    assert main(["index", str(run.path), *FEATURES]) == 0
    image = tmp_path / "query.png"
    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)).save(image)
    before = tree_state(run.path)
    assert main(["query", str(run.path), str(image), *FEATURES]) == 0
    assert main(["index", str(run.path), *FEATURES]) == 0  # the same inputs: loaded, not rebuilt
    assert tree_state(run.path) == before


def test_other_inputs_make_another_index(run):
    bound = open_run(run)
    a = bound.index("das", settings=FeatureSettings(timesteps=2), progress=False)
    b = bound.index("das", settings=FeatureSettings(timesteps=2), lam=1e-2, progress=False)
    assert a.path != b.path and a.path.parent == b.path.parent
    assert json.loads((b.path / "meta.json").read_text())["kernel"]["lam"] == 1e-2


def test_a_missing_index_names_the_command_and_model_methods_are_refused(run):
    bound = open_run(run)
    with pytest.raises(DiffattrError, match="no index of dtrak") as err:
        bound.index("dtrak", settings=FeatureSettings(timesteps=3), build=False, progress=False)
    assert "diffattr index" in err.value.hint
    with pytest.raises(ConfigError, match="ekfac computes its own features"):
        bound.index("ekfac", progress=False)
    assert main(["query", str(run.path), "samples", "--method", "das,trak", "--quiet"]) == 2


def test_an_index_over_rewritten_features_is_rebuilt(run):
    import os

    bound = open_run(run)
    settings = FeatureSettings(timesteps=2)
    index = bound.index("das", settings=settings, progress=False)
    features = (
        run.features_dir
        / json.loads((index.path / "meta.json").read_text())["train_store"]
        / "features.npy"
    )
    built = (index.path / "meta.json").stat().st_mtime_ns
    os.utime(features, ns=(features.stat().st_atime_ns, features.stat().st_mtime_ns + 10**9))
    again = open_run(run).index("das", settings=settings, progress=False)
    assert again.path == index.path and (index.path / "meta.json").stat().st_mtime_ns > built
