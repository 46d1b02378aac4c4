"""The built-in colour data set ``emoji``: Noto Emoji from the npm package
``emoji-datasource-google`` (images Apache-2.0, metadata MIT).

Installed once by the project's set-up, never at run time::

    diffattr data install emoji          # runs `npm pack` for the pinned version

The installer checks the package's sha256, decodes its 3,786 64×64 RGBA PNGs (1,911 emoji and
their skin-tone variants) into one ``uint8`` array and writes beside it each image's file
name, caption (the emoji's name, with its skin tones) and category, and both licences. Loading
composites the images onto a background (white by default, as viewers show emoji) before any
resize, so transparent pixels never carry the colours a PNG happens to store under them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from diffattr.errors import DataError
from diffattr.fsio import atomic_write

PACKAGE = "emoji-datasource-google"
VERSION = "16.0.0"
#: sha256 of ``npm pack emoji-datasource-google@16.0.0``'s tarball.
SHA256 = "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"
NATIVE_SIZE = 64
INSTALL_COMMAND = "diffattr data install emoji"
_IMAGE_DIR = "package/img/google/64/"
_SKIN_TONES = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}
_LAYOUT = 1  # version of the installed layout below


@dataclass(frozen=True)
class EmojiEntry:
    """One image: its PNG's name in the package, caption and category."""

    file: str
    caption: str
    category: str


def data_root() -> Path:
    """Where built-in data is installed: ``$DIFFATTR_DATA_DIR`` or ``~/.cache/diffattr``."""
    env = os.environ.get("DIFFATTR_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffattr"


def install_dir(root: Path | None = None) -> Path:
    return (root or data_root()) / f"emoji-{VERSION}"


def is_installed(root: Path | None = None) -> bool:
    d = install_dir(root)
    return (d / "index.json").is_file() and (d / "rgba64.npy").is_file()


def _caption(name: str, tones: str | None) -> str:
    caption = name.lower()
    if tones:
        words = [_SKIN_TONES.get(code.upper(), code) for code in tones.split("-")]
        caption += f", {' and '.join(dict.fromkeys(words))} skin tone"
    return caption


def entries_from_metadata(emoji: list[dict], available: set[str]) -> list[EmojiEntry]:
    """Every emoji (in the package's sort order) and then each of its skin-tone variants,
    keeping those whose 64-pixel Google image is in ``available``."""
    out: list[EmojiEntry] = []
    for e in sorted(emoji, key=lambda e: e.get("sort_order", 0)):
        name = e.get("name") or e.get("short_name") or e["image"]
        if e["image"] in available:
            out.append(EmojiEntry(e["image"], _caption(name, None), e["category"]))
        for tones, variant in sorted((e.get("skin_variations") or {}).items()):
            if variant["image"] in available:
                out.append(EmojiEntry(variant["image"], _caption(name, tones), e["category"]))
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _npm_pack(dest: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            "installing the emoji data set needs npm (the package comes from the npm registry)",
            hint=f"install Node.js with npm, or fetch {PACKAGE}@{VERSION}'s tarball another "
            f"way and pass it: {INSTALL_COMMAND} --from FILE.tgz",
        )
    spec = f"{PACKAGE}@{VERSION}"
    proc = subprocess.run(
        [npm, "pack", spec, "--silent", "--pack-destination", str(dest)],
        capture_output=True,
        text=True,
    )
    path = dest / f"{PACKAGE}-{VERSION}.tgz"
    if proc.returncode != 0 or not path.is_file():
        raise DataError(f"`npm pack {spec}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return path


def install(
    tarball: str | Path | None = None, root: Path | None = None, sha256: str = SHA256
) -> Path:
    """Install the emoji data set (from ``tarball``, else by ``npm pack``); return its folder.

    The tarball must have the pinned ``sha256``. Nothing is left half-written: the folder is
    assembled beside its final place and renamed into it.
    """
    from PIL import Image

    target = install_dir(root)
    if is_installed(root):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".emoji-") as tmp:
        tmp_path = Path(tmp)
        tgz = Path(tarball) if tarball is not None else _npm_pack(tmp_path)
        if not tgz.is_file():
            raise DataError(f"emoji package file {tgz} does not exist")
        digest = _sha256(tgz)
        if digest != sha256:
            raise DataError(
                f"{tgz} is not {PACKAGE}@{VERSION}: sha256 {digest}, expected {sha256}",
                hint=f"run `{INSTALL_COMMAND}` without --from to fetch the pinned version",
            )
        with tarfile.open(tgz, "r:gz") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}

            def read(name: str) -> bytes:
                if name not in members:
                    raise DataError(f"{tgz} has no {name}")
                return tar.extractfile(members[name]).read()

            metadata = json.loads(read("package/emoji.json"))
            available = {n[len(_IMAGE_DIR) :] for n in members if n.startswith(_IMAGE_DIR)}
            entries = entries_from_metadata(metadata, available)
            rgba = np.empty((len(entries), NATIVE_SIZE, NATIVE_SIZE, 4), dtype=np.uint8)
            for i, entry in enumerate(entries):
                with Image.open(io.BytesIO(read(_IMAGE_DIR + entry.file))) as im:
                    im = im.convert("RGBA")
                    if im.size != (NATIVE_SIZE, NATIVE_SIZE):
                        im = im.resize((NATIVE_SIZE, NATIVE_SIZE), Image.Resampling.LANCZOS)
                    rgba[i] = np.asarray(im)
            stage = tmp_path / "stage"
            stage.mkdir()
            np.save(stage / "rgba64.npy", rgba)
            (stage / "LICENSE-emoji-data.txt").write_bytes(read("package/LICENSE"))
        apache = resources.files("diffattr.data").joinpath("licenses/Apache-2.0.txt")
        (stage / "LICENSE-Noto-Emoji.txt").write_text(apache.read_text(encoding="utf-8"))
        (stage / "README.txt").write_text(
            f"{PACKAGE}@{VERSION} (sha256 {sha256}), installed by `{INSTALL_COMMAND}`.\n"
            "Images: Noto Emoji by Google, Apache License 2.0 (LICENSE-Noto-Emoji.txt).\n"
            "Names and categories: emoji-data by Cal Henderson, MIT (LICENSE-emoji-data.txt).\n"
        )
        index = {
            "package": PACKAGE,
            "version": VERSION,
            "sha256": sha256,
            "layout": _LAYOUT,
            "images": [e.__dict__ for e in entries],
        }
        atomic_write(stage / "index.json", lambda f: f.write(json.dumps(index).encode()))
        if target.exists():  # a stale or partial folder from an older layout
            shutil.rmtree(target)
        os.replace(stage, target)
    return target


def load_rgba(root: Path | None = None) -> tuple[np.ndarray, list[EmojiEntry]]:
    """(N×64×64×4 uint8 RGBA, entries) of the installed data set, or a DataError naming the
    command that installs it."""
    d = install_dir(root)
    if not is_installed(root):
        raise DataError(
            f"built-in dataset 'emoji' is not installed (looked in {d})",
            hint=f"install it once with `{INSTALL_COMMAND}` (set DIFFATTR_DATA_DIR to choose "
            "where)",
        )
    index = json.loads((d / "index.json").read_text())
    if index.get("version") != VERSION or index.get("layout") != _LAYOUT:
        raise DataError(
            f"the emoji data in {d} is from another diffattr version",
            hint=f"reinstall it: remove {d} and run `{INSTALL_COMMAND}`",
        )
    entries = [EmojiEntry(**e) for e in index["images"]]
    rgba = np.load(d / "rgba64.npy", mmap_mode="r")
    if rgba.shape != (len(entries), NATIVE_SIZE, NATIVE_SIZE, 4):
        raise DataError(f"{d / 'rgba64.npy'} has shape {rgba.shape}; reinstall the data set")
    return np.asarray(rgba), entries


def categories(entries: list[EmojiEntry]) -> list[str]:
    """Category names in the order they first appear (the package's sort order)."""
    return list(dict.fromkeys(e.category for e in entries))
