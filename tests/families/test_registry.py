"""diffattr.families.registry: family names to classes, the family of a run, a run opened."""

from __future__ import annotations

import pytest

from diffattr.errors import DiffattrError
from diffattr.families import REGISTRY, Family, family_of, get_family, open_run
from diffattr.families.bound import BoundRun
from diffattr.run import RunDir


def test_every_registered_name_gives_its_family():
    for name in REGISTRY:
        family = get_family(name)
        assert isinstance(family, Family) and family.name == name
        assert get_family(name) is family  # one instance per name


def test_unknown_family_and_missing_run_are_named(tmp_path):
    with pytest.raises(DiffattrError, match="unknown model family 'gan'") as info:
        get_family("gan")
    assert "unconditional" in info.value.hint
    with pytest.raises(DiffattrError, match="does not exist"):
        family_of(RunDir(tmp_path / "nowhere"))
    with pytest.raises(DiffattrError, match="does not exist"):
        open_run(str(tmp_path / "nowhere"))


def test_open_run_takes_a_path(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "run.json").write_text('{"family": "unconditional"}')
    bound = open_run(str(run))
    assert isinstance(bound, BoundRun) and bound.family is get_family("unconditional")
    assert bound.run.path == run
