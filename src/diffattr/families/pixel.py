"""The pixel-space family: an unconditional DDPM UNet trained from scratch (`diffattr train`).

Runs record ``"family": "unconditional"`` (or nothing: runs made before families existed).
The engine differentiates all weights of ``RUN/model`` on the run's training images; targets
are generated samples (with the seeds and initial noise that made them) or held-out images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.attribution.methods import (
    CHECKPOINTS,
    MODEL_CALLS,
    MODEL_INPUTS,
    TRAINING_LOSS,
    TRAJECTORIES,
)
from diffattr.errors import CheckpointError, DiffattrError
from diffattr.families import Family, is_samples_file, samples_path
from diffattr.families.weights import Weights
from diffattr.run import UNCONDITIONAL, RunDir


def check_model_fits(model: torch.nn.Module, shape: tuple[int, int, int], where: Any) -> None:
    """A :class:`CheckpointError` unless ``model`` takes images of ``shape`` (C, H, W)."""
    cfg = model.config
    have = (int(cfg.in_channels), int(cfg.sample_size), int(cfg.out_channels))
    c, h, w = shape
    if have != (c, h, c) or h != w:
        raise CheckpointError(
            f"the model in {where} is for {have[0]}×{have[1]}² images, but the run's data is "
            f"{c}×{h}×{w}",
            hint="the model directory was replaced by another architecture's; retrain with "
            "`diffattr train` or restore the run's model",
        )


class TrainedUNet(Weights):
    """A UNet trained by ``diffattr train`` (``RUN/model``), sampled by diffattr's samplers."""

    def model(self, run: RunDir) -> torch.nn.Module:
        from diffattr.diffusion.presets import load_unet

        return load_unet(run.model_dir)

    def sample(
        self, model: torch.nn.Module, schedule: Any, seeds: Any, sampler: str = "ddim",
        num_steps: int = 50, trajectory: bool = False, progress: bool = True,
        alone: bool = False,
    ) -> Any:  # fmt: skip
        """``Samples`` of ``model`` for ``seeds`` (each generated alone when ``alone``: a batch
        of one, bit-reproducible whatever the other seeds)."""
        from diffattr.diffusion.sampling import sample

        return sample(model, seeds, schedule, sampler, num_steps, batch_size=1 if alone else 64,
                      record_trajectory=trajectory, progress=progress)  # fmt: skip


class PixelFamily(Family):
    """Pixel-space unconditional diffusion: a UNet on the run's images, trained by diffattr
    (:class:`TrainedUNet`) or imported (:class:`~diffattr.families.imported.ImportedUNet`)."""

    modality_provides = frozenset(
        {CHECKPOINTS, TRAJECTORIES, MODEL_CALLS, MODEL_INPUTS, TRAINING_LOSS}
    )

    def __init__(self, name: str = UNCONDITIONAL, weights: Weights | None = None) -> None:
        super().__init__(name, weights or TrainedUNet())

    def config_from_dict(self, data: dict[str, Any]) -> Any:
        from diffattr.diffusion.training import TrainConfig

        return TrainConfig.from_dict(data)

    def schedule_from_config(self, config: dict[str, Any]) -> Any:
        from diffattr.diffusion.schedule import NoiseSchedule

        return NoiseSchedule.from_scheduler_config(config)

    def model(self, run: RunDir) -> torch.nn.Module:
        return self.weights.model(run)

    def check_attributor(self, run: RunDir, attributor: Any) -> None:
        check_model_fits(attributor.model, attributor.train.shape, self.model_dir(run))

    def trajectory_targets(self, run: RunDir, spec: str) -> Any:
        from diffattr.diffusion.sampling import load_samples

        if spec != "samples" and not is_samples_file(Path(spec)):
            raise DiffattrError(
                f"journey-trak attributes generated images with the seeds that made them; "
                f"{spec} has none",
                hint="use it on `samples` or a samples .npz written by `diffattr generate`",
            )
        return load_samples(samples_path(run, spec))

    def generate(self, run: RunDir, seeds: np.ndarray, out: Path, **options: Any) -> Path:
        """Options: ``sampler``, ``num_steps``, ``trajectory``, ``progress``; prompts are
        refused."""
        from diffattr.diffusion.presets import model_fingerprint
        from diffattr.diffusion.sampling import save_samples

        if options.get("prompts"):
            raise DiffattrError(f"{run.path} is an unconditional model: it takes no prompts")
        schedule = self.schedule(run)
        if options["num_steps"] > schedule.num_train_timesteps:
            raise DiffattrError(
                f"--steps must be at most {schedule.num_train_timesteps}, got "
                f"{options['num_steps']}"
            )
        model = self.model(run)
        samples = self.weights.sample(
            model, schedule, seeds, options.get("sampler", "ddim"), options["num_steps"],
            trajectory=options.get("trajectory", False), progress=options.get("progress", True),
        )  # fmt: skip
        return save_samples(samples, out, model_fingerprint(model))

    # ------------------------------------------------------------------ retraining
    def train_model(
        self, dataset: Any, config: Any, out_dir: Path, subset: np.ndarray, device: str = "cpu"
    ) -> Path:
        from diffattr.diffusion import training

        return training.train(
            dataset, config, out_dir, subset=subset, progress=False, device=device
        )

    def load_trained(self, config: Any, model_dir: Path) -> torch.nn.Module:
        from diffattr.diffusion.presets import load_unet

        return load_unet(model_dir)

    def regenerate(
        self,
        model: torch.nn.Module,
        data: dict[str, Any],
        config: Any,
        seeds: list[int],
        sampler: str,
        num_steps: int,
    ) -> np.ndarray:
        samples = self.weights.sample(
            model, config.schedule, seeds, sampler, num_steps, progress=False, alone=True
        )
        return samples.images.numpy().astype(np.float32)

    def lds_targets(
        self, run: RunDir, val_set: Any, num_val: int, seeds: np.ndarray, progress: bool = True
    ) -> dict[str, np.ndarray]:
        gen = self.weights.sample(self.model(run), self.schedule(run), seeds, progress=progress)
        images = torch.cat([val_set.images[:num_val], gen.images])
        return {"images": images.numpy().astype(np.float32)}
