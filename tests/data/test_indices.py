"""diffattr.data.indices: index files: round trips and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffattr.data import (
    load_indices,
    sample_subsets,
    save_indices,
)
from diffattr.errors import DataError


def test_indices_round_trip(tmp_path: Path) -> None:
    one = np.array([5, 0, 17, 3])
    two = sample_subsets(30, 3, seed=1)
    for name, arr in (("a.npy", one), ("b.npy", two), ("c.txt", one), ("d.txt", two)):
        save_indices(tmp_path / name, arr)
        back = load_indices(tmp_path / name)
        assert back.dtype == np.int64 and np.array_equal(back, arr), name
    assert load_indices(tmp_path / "a.npy", max_index=17).shape == (4,)
    with pytest.raises(DataError, match="a.npy"):
        load_indices(tmp_path / "a.npy", max_index=16)


def test_bad_index_files(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_text("1\n2\nthree\n")
    with pytest.raises(DataError, match="bad.txt"):
        load_indices(tmp_path / "bad.txt")
    (tmp_path / "ragged.txt").write_text("1 2\n3\n")
    with pytest.raises(DataError, match="ragged.txt"):
        load_indices(tmp_path / "ragged.txt")
    np.save(tmp_path / "float.npy", np.array([0.5, 1.0]))
    with pytest.raises(DataError, match="float.npy"):
        load_indices(tmp_path / "float.npy")
    np.save(tmp_path / "neg.npy", np.array([1, -2]))
    with pytest.raises(DataError, match="neg.npy"):
        load_indices(tmp_path / "neg.npy")
    (tmp_path / "junk.npy").write_bytes(b"\x00junk")
    with pytest.raises(DataError, match="junk.npy"):
        load_indices(tmp_path / "junk.npy")
    with pytest.raises(DataError, match="neg.csv"):
        save_indices(tmp_path / "neg.csv", np.array([1]))
