"""A run directory: one trained model and everything derived from it.

Layout (each stage writes its own part, atomically, and can be resumed)::

    RUN/run.json          model family, data spec and training config (written by `train`)
    RUN/train.json        training manifest; RUN/model/ final EMA weights; RUN/checkpoints/
    RUN/samples/          generated targets: samples.npz (images, seeds, initial noise), PNGs
    RUN/features/         feature stores (train set and targets, one per measure/settings)
    RUN/scores/           score arrays and top-k tables per method
    RUN/report.html       the report
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from diffattr.data import DEFAULT_BACKGROUND, ImageDataset, load_dataset, train_val_split
from diffattr.errors import DiffattrError
from diffattr.fsio import atomic_write_json, read_json


@dataclass
class DataSpec:
    """Which images a run trains on: a dataset and a deterministic train/val split of it."""

    data: str = "digits"
    size: int | None = None
    mismatch: str = "error"
    val_count: int | None = None  # None: a fifth of the images, at most 200
    train_count: int | None = None
    split_seed: int = 0
    background: str = DEFAULT_BACKGROUND  # what transparent pixels of colour images become

    def load(self) -> tuple[ImageDataset, ImageDataset]:
        """(train, val) datasets; ids are those of the full dataset."""
        _, train, val = self.resolve()
        return train, val

    def resolve(self) -> tuple[DataSpec, ImageDataset, ImageDataset]:
        """(this spec with its ``val_count`` fixed, train, val): what a new run records."""
        full = load_dataset(
            self.data, size=self.size, mismatch=self.mismatch, background=self.background
        )
        count = self.val_count if self.val_count is not None else min(200, len(full) // 5)
        train, val = train_val_split(
            full, val_count=count, seed=self.split_seed, train_count=self.train_count
        )
        return replace(self, val_count=count), train, val


#: Model families recorded in run.json (:mod:`diffattr.families` implements each):
#: ``unconditional``, a pixel-space UNet trained from scratch (`diffattr train`);
#: ``text2image``, LoRA on a latent text-to-image pipeline (`diffattr finetune`).
UNCONDITIONAL, TEXT2IMAGE = "unconditional", "text2image"


class RunDir:
    """Paths and the manifest of a run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / "run.json"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def features_dir(self) -> Path:
        return self.path / "features"

    @property
    def scores_dir(self) -> Path:
        return self.path / "scores"

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    def manifest(self) -> dict[str, Any]:
        if not self.path.is_dir():
            raise DiffattrError(
                f"run directory {self.path} does not exist",
                hint="make one with `diffattr train`, `diffattr finetune` or `diffattr import`",
            )
        if not self.manifest_path.is_file():
            raise DiffattrError(
                f"{self.path} is not a diffattr run (no run.json)",
                hint="create one with `diffattr train --out DIR`",
            )
        return read_json(self.manifest_path)

    def update(self, section: str, value: Any) -> None:
        """Set one section of run.json (atomic rewrite)."""
        data = read_json(self.manifest_path) if self.manifest_path.is_file() else {}
        data[section] = value
        atomic_write_json(self.manifest_path, data)

    @property
    def family(self) -> str:
        """The run's model family (runs made before families existed are unconditional; a
        missing run.json is reported by the step that needs it)."""
        if not self.manifest_path.is_file():
            return UNCONDITIONAL
        return self.manifest().get("family", UNCONDITIONAL)

    def data_spec(self) -> DataSpec:
        return DataSpec(**self.manifest()["data"])

    def start(self, spec: DataSpec, config: Any, family: str = UNCONDITIONAL) -> None:
        """Record the family, data spec and training config, refusing to change those of an
        existing run."""
        if self.manifest_path.is_file():
            have = read_json(self.manifest_path).get("family", UNCONDITIONAL)
            if have != family:
                raise DiffattrError(
                    f"{self.path} holds a {have} run, not a {family} one",
                    hint="use another --out directory",
                )
        self.update("family", family)
        wanted = {"data": asdict(spec), "train": config.to_dict()}
        if self.manifest_path.is_file():
            have = read_json(self.manifest_path)
            for key, value in wanted.items():
                old = have.get(key)
                if old is not None and _comparable(old) != _comparable(value):
                    diff = sorted(k for k in set(old) | set(value) if old.get(k) != value.get(k))
                    raise DiffattrError(
                        f"{self.path} was created with other {key} settings ({', '.join(diff)})",
                        hint="use another --out directory or the original settings",
                    )
        for key, value in wanted.items():
            self.update(key, value)


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    if "split_seed" in d:  # a data spec: runs from before backgrounds composited onto white
        d.setdefault("background", DEFAULT_BACKGROUND)
    d.pop("checkpoint_every", None)
    d.pop("keep_checkpoints", None)
    return d
