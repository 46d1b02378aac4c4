"""The default configuration (method, K) is one value, used by every entry point and the docs."""

import re
from pathlib import Path

from diffattr.attribution.defaults import DEFAULT_TIMESTEPS
from diffattr.attribution.features.featurize import FeatureSettings
from diffattr.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
METHODS_PAGE = ROOT / "docs" / "methods.md"  # "The default configuration"


def test_every_entry_point_uses_the_default_timesteps():
    parser = build_parser()
    assert FeatureSettings().timesteps == DEFAULT_TIMESTEPS
    for argv in (["score", "r"], ["featurize", "r"], ["demo"]):
        assert parser.parse_args(argv).timesteps == DEFAULT_TIMESTEPS, argv
    # lds eval evaluates the default K unless told otherwise, so default_lds is the default's.
    assert parser.parse_args(["lds", "eval", "b"]).timesteps == str(DEFAULT_TIMESTEPS)


def test_docs_state_the_default_configuration():
    found = re.search(r"default is\s+`--method (\S+) --timesteps (\d+)`", METHODS_PAGE.read_text())
    assert found, "docs/methods.md does not state the default configuration"
    method, timesteps = found.groups()
    assert int(timesteps) == DEFAULT_TIMESTEPS
    assert build_parser().parse_args(["score", "r"]).method == method
