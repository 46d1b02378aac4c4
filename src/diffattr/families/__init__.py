"""Model families (registered by ``run.json``'s ``family``): what differs between kinds of
diffusion model — training config, the attributed model and data, default parameters, targets,
generation, retraining for evaluation. The engine never imports them; a method whose
``requirements()`` a family does not ``provide`` is refused (``docs/architecture.md``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from diffattr.errors import ConfigError, DataError, DiffattrError, notice
from diffattr.families.registry import REGISTRY as REGISTRY
from diffattr.families.registry import family_of as family_of
from diffattr.families.registry import get_family as get_family
from diffattr.families.registry import load_for_worker as load_for_worker
from diffattr.families.registry import open_run as open_run
from diffattr.families.weights import Weights
from diffattr.run import DataSpec, RunDir


def is_samples_file(path: Path) -> bool:
    """Whether ``path`` is a samples ``.npz`` written by ``diffattr generate`` (with seeds)."""
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    with np.load(path, allow_pickle=False) as z:
        return "seeds" in z.files


def given_images(run: RunDir, path: Path) -> Any:
    """Images a user gives as targets (an image file, a folder searched recursively, or an
    ``.npz`` of images), under the run's one size policy: images of the training images' size
    are taken as they are; others are resized (with a note saying so) when the run resized its
    own images (``--size`` or ``--mismatch resize``), else refused naming the option."""
    from diffattr.data import load_dataset, resize_images

    if not path.exists():
        raise DataError(f"targets {str(path)!r} are neither 'samples', 'val' nor a file or folder")
    spec = run.data_spec()
    images = load_dataset(str(path), None, spec.mismatch, spec.background)
    want = tuple(spec.load()[0].shape)
    have = tuple(images.shape)
    if have[0] != want[0]:
        raise DataError(
            f"targets in {path} have {have[0]} channel(s), the run's training images {want[0]}",
            hint="give images with the training data's channels (grey or colour)",
        )
    if have[1:] != want[1:]:
        size = "×".join(map(str, want[1:]))
        if spec.size is None and spec.mismatch != "resize":
            raise DataError(
                f"targets in {path} are {'×'.join(map(str, have[1:]))} images, the run's "
                f"training images {size}",
                hint=f"give {size} images (the run was trained without --size or "
                "--mismatch resize, so targets are not resized either)",
            )
        how = f"--size {spec.size}" if spec.size is not None else "--mismatch resize"
        notice(f"targets in {path} resized from {'×'.join(map(str, have[1:]))} to {size}, as "
               f"the run's training images were ({how})")  # fmt: skip
        images = resize_images(images, want[1:])
    return images


def samples_path(run: RunDir, spec: str) -> Path:
    """The samples file of target ``spec`` (``samples`` or a path), or a clear error."""
    path = run.samples_dir / "samples.npz" if spec == "samples" else Path(spec)
    if path.is_file():
        return path
    if spec == "samples":
        raise DiffattrError(
            f"no generated samples in {run.samples_dir}",
            hint=f"run `diffattr generate {run.path}` first",
        )
    raise DataError(f"targets {spec!r} are neither 'samples', 'val' nor a file")


class Family(ABC):
    """The model family interface (module docstring): a modality (this class's subclass)
    holding a weights source (:mod:`diffattr.families.weights`). The defaults serve a family
    whose data are the run's images (``DataSpec``); a family in another space overrides them."""

    #: What the modality offers methods beyond the final model and its features (names of
    #: ``diffattr.attribution.methods``: checkpoints, trajectories, model-calls, …), before
    #: the weights source takes away what it lacks.
    modality_provides: ClassVar[frozenset[str]] = frozenset()
    #: What retraining for an evaluation trains, and the command whose options that takes.
    retrains: ClassVar[str] = "the model"
    train_command: ClassVar[str] = "diffattr train"

    def __init__(self, name: str, weights: Weights) -> None:
        self.name, self.weights = name, weights
        #: What methods may use: the modality's offer, as far as the weights allow.
        self.provides = self.modality_provides & weights.provides

    # ------------------------------------------------------------------ a run's contents
    @abstractmethod
    def config_from_dict(self, data: dict[str, Any]) -> Any:
        """The training configuration recorded in ``run.json`` (or a worker's job)."""

    def train_config(self, run: RunDir) -> Any:
        """The run's training settings (an imported run's from ``--train-config``)."""
        return self.config_from_dict(
            self.weights.train_settings(run, self.retrains, self.train_command)
        )

    @abstractmethod
    def schedule_from_config(self, config: dict[str, Any]) -> Any:
        """The noise process of a diffusers scheduler config (an imported model's)."""

    def schedule(self, run: RunDir) -> Any:
        """The model's noise process (a :class:`~diffattr.diffusion.schedule.NoiseSchedule`):
        the imported scheduler's, else the training settings'."""
        config = self.weights.scheduler_config(run)
        return (
            self.train_config(run).schedule if config is None else self.schedule_from_config(config)
        )

    def model_dir(self, run: RunDir) -> Path:
        """Where the run's model is (what :meth:`load_trained` reads)."""
        return self.weights.model_dir(run)

    @abstractmethod
    def model(self, run: RunDir) -> torch.nn.Module:
        """The attributed model (the final weights, as the engine differentiates them)."""

    def train_set(self, run: RunDir) -> Any:
        """The training set as the engine attributes it (images, or latents with their
        ``conditioning``)."""
        return run.data_spec().load()[0]

    def feature_settings(self, run: RunDir, settings: Any) -> Any:
        """``settings`` with the family's default parameter set (``params``) for ``run``
        where unset."""
        return settings

    def targets(self, run: RunDir, spec: str) -> tuple[str, Any, np.ndarray]:
        """(name, targets as the attributor takes them, ids) of ``samples``, ``val`` or a
        samples file."""
        return self.images(run, spec)

    def images(self, run: RunDir, spec: str) -> tuple[str, torch.Tensor, np.ndarray]:
        """(name, images, ids) of target ``spec`` as pictures (what the report shows):
        ``samples``, ``val``, a samples ``.npz``, or any images — an image file, a folder
        (recursive) or an ``.npz`` without seeds — loaded as the run's training data is."""
        from diffattr.diffusion.sampling import load_samples

        if spec == "val":
            _, val = run.data_spec().load()
            return "val", val.images, val.ids.numpy()
        path = Path(spec)
        if spec != "samples" and not is_samples_file(path):
            given = given_images(run, path)
            return path.stem, given.images, given.ids.numpy()
        path = samples_path(run, spec)
        s = load_samples(path)
        return ("samples" if spec == "samples" else path.stem), s.images, np.arange(len(s))

    def trajectory_targets(self, run: RunDir, spec: str) -> Any:
        """Generated targets with the seeds that made them (methods needing trajectories)."""
        raise ConfigError(f"{self.name} runs record no sampling trajectories")

    @abstractmethod
    def generate(self, run: RunDir, seeds: np.ndarray, out: Path, **options: Any) -> Path:
        """Generate and save images for ``seeds`` into ``out``; the samples file."""

    # ------------------------------------------------------------------ attribution
    def check_method(self, method: Any) -> None:
        """A :class:`ConfigError` unless this family provides what ``method`` needs."""
        from diffattr.attribution.methods import METHODS

        missing = sorted(method.requirements() - self.provides)
        if missing:
            usable = sorted(n for n, cls in METHODS.items() if cls.needs <= self.provides)
            raise ConfigError(
                f"{method.name} is not available for {self.name} runs (it needs "
                f"{', '.join(missing)})",
                hint=f"use {', '.join(usable)}",
            )

    def open(self, run: RunDir) -> Any:
        """A :class:`~diffattr.families.bound.BoundRun`: ``run`` with its model, training set
        and schedule loaded once, scoring methods on it."""
        from diffattr.families.bound import BoundRun

        return BoundRun(self, run)

    def check_attributor(self, run: RunDir, attributor: Any) -> None:  # noqa: B027 - optional
        """Refuse an attributor the run cannot serve (nothing by default)."""

    # ------------------------------------------------------------------ retraining
    def job_data(self, run: RunDir) -> dict[str, Any]:
        """What a worker needs to retrain on the run's data (JSON-safe)."""
        return asdict(run.data_spec())

    def retrain_data(self, run: RunDir, samples_path: Path) -> dict[str, Any]:
        """What a worker needs to retrain and regenerate the samples in ``samples_path``."""
        return self.job_data(run)

    def retrain_set(self, data: dict[str, Any]) -> Any:
        """The training set a retraining job draws its subset from (``job_data``'s)."""
        return DataSpec(**data).load()[0]

    @abstractmethod
    def train_model(
        self, dataset: Any, config: Any, out_dir: Path, subset: np.ndarray, device: str = "cpu"
    ) -> Path:
        """Train (resuming) on ``dataset``'s ``subset`` positions; the model directory."""

    @abstractmethod
    def load_trained(self, config: Any, model_dir: Path) -> torch.nn.Module:
        """A model written by :meth:`train_model` (or the run's own ``model/``)."""

    @abstractmethod
    def regenerate(
        self,
        model: torch.nn.Module,
        data: dict[str, Any],
        config: Any,
        seeds: list[int],
        sampler: str,
        num_steps: int,
    ) -> np.ndarray:
        """(len(seeds), …) images regenerated alone (batch of one: bit-reproducible)."""

    def benchmark_fields(self, run: RunDir) -> dict[str, Any]:
        """What an LDS benchmark's manifest records, beyond the data spec, so that it can be
        evaluated without the run."""
        return {}

    def benchmark_train_set(self, manifest: dict[str, Any]) -> Any:
        """The training set of an LDS benchmark, from its manifest."""
        return DataSpec(**manifest["data"]).load()[0]

    @abstractmethod
    def lds_targets(
        self, run: RunDir, val_set: Any, num_val: int, seeds: np.ndarray, progress: bool = True
    ) -> dict[str, np.ndarray]:
        """LDS targets: ``images`` (the first ``num_val`` held-out images, then one image
        generated by the run's model per seed), and ``conditioning`` / ``prompts`` where the
        model takes them."""
