"""The built-in colour data set ``emoji`` (diffattr.data.emoji), on a tiny package built here:
installing from a tarball (checksum, licences, nothing half-written), names and categories,
compositing onto the background, and the error that names the install command."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffattr.data import emoji, load_builtin, load_dataset
from diffattr.errors import DataError
from diffattr.run import DataSpec

# Opaque red disc on a transparent square whose hidden pixels are saturated green.
HIDDEN = (0, 255, 0)


def _png(colour: tuple[int, int, int]) -> bytes:
    a = np.zeros((64, 64, 4), dtype=np.uint8)
    a[..., :3] = HIDDEN  # stored under alpha 0: no viewer shows it
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 < 16**2
    a[disc] = (*colour, 255)
    buf = io.BytesIO()
    Image.fromarray(a, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def _package(path: Path) -> str:
    """A tarball shaped like emoji-datasource-google: two emoji, one with two skin tones."""
    meta = [
        {"name": "WAVING HAND SIGN", "image": "1f44b.png", "category": "People & Body",
         "sort_order": 2, "skin_variations": {
             "1F3FD": {"image": "1f44b-1f3fd.png"}, "1F3FB-1F3FF": {"image": "1f44b-x.png"}}},
        {"name": "GRINNING FACE", "image": "1f600.png", "category": "Smileys & Emotion",
         "sort_order": 1},
        {"name": "NO IMAGE", "image": "ffff.png", "category": "Symbols", "sort_order": 3},
    ]  # fmt: skip
    files = {
        "package/emoji.json": json.dumps(meta).encode(),
        "package/LICENSE": b"MIT licence text",
        "package/img/google/64/1f600.png": _png((255, 200, 0)),
        "package/img/google/64/1f44b.png": _png((255, 0, 0)),
        "package/img/google/64/1f44b-1f3fd.png": _png((150, 100, 50)),
        "package/img/google/64/1f44b-x.png": _png((90, 60, 30)),
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def installed(tmp_path, monkeypatch) -> Path:
    tgz = tmp_path / "pkg.tgz"
    digest = _package(tgz)
    monkeypatch.setenv("DIFFATTR_DATA_DIR", str(tmp_path / "data"))
    emoji.install(tgz, sha256=digest)
    return tmp_path / "data"


def test_missing_data_set_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFATTR_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as err:
        load_builtin("emoji16")
    assert "not installed" in str(err.value)
    assert "diffattr data install emoji" in err.value.hint


def test_wrong_checksum_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    tgz = tmp_path / "pkg.tgz"
    _package(tgz)
    monkeypatch.setenv("DIFFATTR_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(DataError, match="sha256"):
        emoji.install(tgz)  # the pinned checksum of the real package
    assert not emoji.is_installed()
    assert [p.name for p in (tmp_path / "data").iterdir()] == []


def test_install_keeps_names_categories_and_licences(installed):
    d = emoji.install_dir()
    assert (d / "LICENSE-emoji-data.txt").read_text() == "MIT licence text"
    assert "Apache License" in (d / "LICENSE-Noto-Emoji.txt").read_text()
    rgba, entries = emoji.load_rgba()
    assert rgba.shape == (4, 64, 64, 4) and rgba.dtype == np.uint8
    # sort order first, variants after their emoji; the emoji without an image is left out
    assert [e.caption for e in entries] == [
        "grinning face",
        "waving hand sign",
        "waving hand sign, light and dark skin tone",
        "waving hand sign, medium skin tone",
    ]
    assert emoji.categories(entries) == ["Smileys & Emotion", "People & Body"]


def test_loaded_images_are_composited_onto_the_background(installed):
    ds = load_builtin("emoji")
    assert ds.shape == (3, 64, 64) and len(ds) == 4
    assert ds.labels.tolist() == [0, 1, 1, 1]
    assert ds.captions[0] == "grinning face"
    corner = ds.images[:, :, 0, 0]  # transparent in every file, green underneath
    assert np.allclose(corner.numpy(), 1.0)  # white in [-1, 1]
    centre = ds.images[1, :, 32, 32]
    assert np.allclose(centre.numpy(), [1.0, -1.0, -1.0])  # the opaque red stays red
    black = load_dataset("emoji", background="black")
    assert np.allclose(black.images[:, :, 0, 0].numpy(), -1.0)
    assert black.fingerprint() != ds.fingerprint()
    small = load_builtin("emoji16")
    assert small.shape == (3, 16, 16)
    assert np.allclose(small.images[:, :, 0, 0].numpy(), 1.0)


def test_run_data_spec_records_the_background(installed):
    spec, train, val = DataSpec(data="emoji16", val_count=1, background="#000000").resolve()
    assert spec.background == "#000000"
    assert len(train) == 3 and len(val) == 1
    assert np.allclose(train.images[:, :, 0, 0].numpy(), -1.0)


def test_cli_install_takes_common_options_and_refuses_a_wrong_package(
    tmp_path, monkeypatch, capsys
):
    from diffattr.cli import main

    tgz = tmp_path / "pkg.tgz"
    _package(tgz)
    monkeypatch.setenv("DIFFATTR_DATA_DIR", str(tmp_path / "data"))
    assert main(["data", "install", "emoji", "--from", str(tgz), "--quiet", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "is not emoji-datasource-google@16.0.0" in err and "sha256" in err
    assert not emoji.is_installed()
