"""diffattr.fsio: writes that are whole or absent, manifests that refuse mixed settings."""

import json

import numpy as np
import pytest

from diffattr.errors import DiffattrError
from diffattr.fsio import (
    atomic_directory,
    atomic_write,
    atomic_write_json,
    atomic_write_npz,
    claim_manifest,
    first_missing_ancestor,
    read_json,
    removed_on_error,
)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"x": 1})

    def half(f):
        f.write(b'{"x": ')
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(path, half)
    assert read_json(path) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_npz_and_json_round_trip_into_new_directories(tmp_path):
    atomic_write_npz(tmp_path / "d" / "e" / "z.npz", a=np.arange(3), b=np.eye(2))
    with np.load(tmp_path / "d" / "e" / "z.npz") as z:
        assert z["a"].tolist() == [0, 1, 2] and z["b"].shape == (2, 2)
    atomic_write_json(tmp_path / "j.json", {"b": 2, "a": [1]})
    text = (tmp_path / "j.json").read_text()
    assert text.index('"a"') < text.index('"b"') and json.loads(text) == {"a": [1], "b": 2}


def test_read_json_names_the_file(tmp_path):
    with pytest.raises(DiffattrError, match="missing.json does not exist"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DiffattrError, match="cannot read .*bad.json"):
        read_json(tmp_path / "bad.json")


def test_claim_manifest_accepts_the_same_settings_and_refuses_others(tmp_path):
    path = tmp_path / "store" / "manifest.json"
    claim_manifest(path, {"k": 4, "note": "first"}, ("k",), "features")
    claim_manifest(path, {"k": 4, "note": "second"}, ("k",), "features")  # note is not checked
    assert read_json(path)["note"] == "first"
    with pytest.raises(DiffattrError, match="holds features with other k settings"):
        claim_manifest(path, {"k": 8}, ("k",), "features")


def test_removed_on_error_removes_only_what_the_block_created(tmp_path):
    (tmp_path / "old").mkdir()
    target = tmp_path / "old" / "new" / "deeper"
    assert first_missing_ancestor(target) == tmp_path / "old" / "new"
    with pytest.raises(ValueError), removed_on_error(target):
        target.mkdir(parents=True)
        raise ValueError
    assert (tmp_path / "old").is_dir() and not (tmp_path / "old" / "new").exists()
    with pytest.raises(ValueError), removed_on_error(target, keep=lambda p: True):
        target.mkdir(parents=True)
        raise ValueError
    assert target.is_dir()  # resumable work is kept


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    with atomic_directory(tmp_path / "out") as d:
        (d / "f.txt").write_text("one")
    assert (tmp_path / "out" / "f.txt").read_text() == "one"
    with pytest.raises(KeyError), atomic_directory(tmp_path / "out") as d:
        (d / "f.txt").write_text("two")
        raise KeyError
    assert (tmp_path / "out" / "f.txt").read_text() == "one"  # the old one stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
