"""Seeded, resumable DDPM training (ε-prediction, AdamW, EMA) on a dataset or a subset of it.

Randomness never depends on batch composition (common random numbers):
- initial weights come from a generator keyed by the run seed only;
- batches are slices of a stream of per-epoch permutations of the subset, keyed by (seed, epoch);
- a sample's timestep and noise at its n-th visit come from :func:`visit_noise` (seed, id, n).
So two models trained with one seed on different subsets differ only through their data.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from diffattr.data import ImageDataset
from diffattr.diffusion.presets import build_unet, load_unet, model_fingerprint
from diffattr.diffusion.schedule import INIT_KEY, PERMUTATION_KEY, NoiseSchedule, visit_noise
from diffattr.errors import CheckpointError, ConfigError, DataError
from diffattr.fsio import atomic_directory, atomic_write_json, read_json
from diffattr.seeding import derive_seed, generator

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")


@dataclass
class TrainConfig:
    """Settings of one training run; everything that changes the weights is here."""

    preset: str = "tiny"
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: bool = True
    stream_salt: int = 0
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)

    def stream_seed(self) -> int:
        """The seed of every random stream: ``seed`` itself, or salted (no common numbers).

        ``stream_salt`` = 0 (default) gives common random numbers across runs with one seed;
        a distinct salt per run gives independent initial weights, batches and noise.
        """
        if self.stream_salt == 0:
            return self.seed
        return derive_seed(self.seed, 7777, self.stream_salt) % 2**31

    def validate(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("--ema-decay must be in [0, 1)")
        if self.seed < 0:
            raise ConfigError(f"--seed must be non-negative, got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schedule"] = self.schedule.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["schedule"] = NoiseSchedule(**d.get("schedule", {}))
        return cls(**d)

    def weights_key(self) -> dict[str, Any]:
        """The settings that determine the weights (not bookkeeping such as checkpointing)."""
        d = self.to_dict()
        d.pop("checkpoint_every")
        d.pop("keep_checkpoints")
        return d


def subset_hash(ids: np.ndarray) -> str:
    """sha256 of the sorted training ids: identifies a subset."""
    return hashlib.sha256(np.sort(np.asarray(ids, dtype=np.int64)).tobytes()).hexdigest()


class BatchStream:
    """Step s's batch = elements [sB, sB+B) of the concatenated per-epoch permutations.

    Element g is position ``perm_e[g mod n]`` at visit e = g // n; ``perm_e`` is keyed by
    (seed, epoch), so the stream is a pure function of (seed, n, B, s).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int) -> None:
        self.n, self.b, self.seed = num_items, batch_size, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            g = generator(self.seed, PERMUTATION_KEY, epoch)
            self._perm = torch.randperm(self.n, generator=g).numpy()
            self._epoch = epoch
        return self._perm

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions within the subset and visit numbers of the batch at ``step``."""
        g = np.arange(step * self.b, (step + 1) * self.b, dtype=np.int64)
        epochs, offsets = g // self.n, g % self.n
        positions = np.empty_like(g)
        for e in np.unique(epochs):
            mask = epochs == e
            positions[mask] = self._permutation(int(e))[offsets[mask]]
        return positions, epochs


def initial_model(config: TrainConfig, sample_size: int, channels: int) -> UNet2DModel:
    """The UNet with initial weights keyed by the run seed (identical for every subset).

    A ``preset`` naming a saved model directory starts from its weights instead (fine-tuning).
    """
    if (Path(config.preset) / "config.json").is_file() and any(
        Path(config.preset).glob("diffusion_pytorch_model.*")
    ):
        model = load_unet(config.preset)
        if (model.config.sample_size, model.config.in_channels) != (sample_size, channels):
            raise CheckpointError(
                f"model in {config.preset} is for {model.config.in_channels}×"
                f"{model.config.sample_size}² images, the data is {channels}×{sample_size}²"
            )
        model.train()
        return model
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(derive_seed(config.stream_seed(), INIT_KEY))
        return build_unet(config.preset, sample_size, channels)
    finally:
        torch.random.set_rng_state(state)


def _lr_lambda(warmup: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    ema: EMAModel | None = None  # averaged weights, stepped after every optimizer step


class Recipe(ABC):
    """What differs between kinds of training (:func:`fit` runs the loop for all): the model
    and optimizer, what a checkpoint holds besides the optimizer state, the final model."""

    desc = "train"
    log_every = 50
    final_file = "config.json"  # in ``out_dir/model`` once the run is finished

    @abstractmethod
    def new_state(self) -> TrainState:
        """The seeded initial model, its optimizer and LR schedule (and EMA)."""

    @abstractmethod
    def save_weights(self, state: TrainState, directory: Path) -> None:
        """Write the trained weights into a checkpoint ``directory``."""

    @abstractmethod
    def load_weights(self, state: TrainState, directory: Path) -> None:
        """Load a checkpoint's weights into ``state``."""

    @abstractmethod
    def save_final(self, state: TrainState, directory: Path) -> torch.nn.Module:
        """Write the final model into ``directory``; the model written."""


def optimizer_state(model: torch.nn.Module, config: TrainConfig, params=None) -> TrainState:
    """AdamW over ``params`` (default: all of ``model``'s) with linear warm-up."""
    optimizer = torch.optim.AdamW(
        model.parameters() if params is None else params,
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup_steps))
    return TrainState(model, optimizer, scheduler)


class UNetRecipe(Recipe):
    """A pixel-space UNet trained from scratch, with EMA weights (the final model)."""

    def __init__(self, config: TrainConfig, sample_size: int, channels: int, device) -> None:
        self.config, self.size, self.channels, self.device = config, sample_size, channels, device

    def new_state(self) -> TrainState:
        model = initial_model(self.config, self.size, self.channels).to(self.device)  # drawn on CPU
        state = optimizer_state(model, self.config)
        state.ema = EMAModel(model.parameters(), decay=self.config.ema_decay)
        return state

    def save_weights(self, state: TrainState, directory: Path) -> None:
        state.model.save_pretrained(directory / "model")
        _ema_copy(state).save_pretrained(directory / "ema")

    def load_weights(self, state: TrainState, directory: Path) -> None:
        state.model.load_state_dict(load_unet(directory / "model").state_dict())

    def save_final(self, state: TrainState, directory: Path) -> torch.nn.Module:
        final = _ema_copy(state)
        final.save_pretrained(directory)
        return final


def checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a training run, sorted by step."""
    root = out_dir / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = CHECKPOINT_PATTERN.match(p.name)
            if m and (p / "state.json").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _save_checkpoint(
    state: TrainState, recipe: Recipe, out_dir: Path, meta: dict[str, Any]
) -> Path:
    path = out_dir / "checkpoints" / f"step-{state.step:07d}"
    with atomic_directory(path) as tmp:
        recipe.save_weights(state, tmp)
        trainer = {
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
        }
        if state.ema is not None:
            trainer["ema"] = state.ema.state_dict()
        torch.save(trainer, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({**meta, "step": state.step}, indent=2))
    return path


def _ema_copy(state: TrainState) -> UNet2DModel:
    ema_model = UNet2DModel.from_config(state.model.config)
    ema_model.load_state_dict(state.model.state_dict())
    state.ema.copy_to(ema_model.parameters())
    return ema_model


def _load_checkpoint(path: Path, recipe: Recipe, device: str | torch.device) -> TrainState:
    state = recipe.new_state()
    try:
        recipe.load_weights(state, path)
        trainer = torch.load(path / "trainer.pt", weights_only=False, map_location=device)
        state.optimizer.load_state_dict(trainer["optimizer"])
        state.scheduler.load_state_dict(trainer["scheduler"])
        if state.ema is not None:
            state.ema.load_state_dict(trainer["ema"])
        state.step = int(json.loads((path / "state.json").read_text())["step"])
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"cannot resume from checkpoint {path}: {exc}",
            hint="delete that checkpoint directory to restart from the previous one",
        ) from exc
    return state


def train(
    dataset: ImageDataset,
    config: TrainConfig,
    out_dir: str | Path,
    subset: np.ndarray | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Train (or resume) a UNet on ``dataset`` (or the rows ``subset`` of it) into ``out_dir``
    (:func:`fit`); the final EMA weights go to ``out_dir/model``. ``device``: where the model
    trains (the initial weights, timesteps and noise are drawn on CPU whatever it is, so common
    random numbers hold; CUDA kernels are not bit-reproducible run to run)."""
    c, h, _ = dataset.shape
    recipe = UNetRecipe(config, h, c, device)
    return fit(dataset, config, out_dir, recipe, subset, progress, stop_after, device)


def fit(
    dataset: Any,
    config: TrainConfig,
    out_dir: str | Path,
    recipe: Recipe,
    subset: np.ndarray | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Train (or resume) ``recipe``'s model on ``dataset`` (or its rows ``subset``).

    Loss per step: mean over the batch of ‖ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t[, c]) − y‖² / d, with y
    the model's target (ε, v or x₀: ``NoiseSchedule.target``) and c the dataset's
    ``conditioning`` when it has one (caption embeddings). Writes
    ``out_dir/checkpoints/step-N`` every ``checkpoint_every`` steps (atomic), the final model
    to ``out_dir/model`` and ``out_dir/train.json`` (manifest). Rerunning resumes from the last
    complete checkpoint; a finished run returns at once. ``stop_after`` stops early after that
    many steps in this call (for tests of resumption). Returns the final model directory.
    """
    config.validate()
    out_dir = Path(out_dir)
    positions = np.arange(len(dataset)) if subset is None else np.asarray(subset, dtype=np.int64)
    if positions.size == 0:
        raise DataError("cannot train on an empty dataset or subset")
    if positions.min() < 0 or positions.max() >= len(dataset):
        raise DataError(f"subset indices out of range for a dataset of {len(dataset)} images")
    ids = dataset.ids[torch.as_tensor(positions)].numpy()
    meta = {
        "config": config.weights_key(),
        "dataset_fingerprint": dataset.fingerprint(),
        "subset_hash": subset_hash(ids),
        "num_train": int(positions.size),
    }
    manifest_path = out_dir / "train.json"
    if manifest_path.is_file() and (out_dir / "model" / recipe.final_file).is_file():
        _check_same_run(read_json(manifest_path), meta, manifest_path)
        return out_dir / "model"
    out_dir.mkdir(parents=True, exist_ok=True)
    found = checkpoints(out_dir)
    if found:
        prev = json.loads((found[-1][1] / "state.json").read_text())
        _check_same_run(prev, meta, found[-1][1] / "state.json")
        state = _load_checkpoint(found[-1][1], recipe, device)
    else:
        state = recipe.new_state()
    model = state.model
    model.train()
    schedule, seed = config.schedule, config.stream_seed()
    stream = BatchStream(positions.size, config.batch_size, seed)
    shape = tuple(dataset.shape)
    conditioning = getattr(dataset, "conditioning", None)
    t0 = time.time()
    bar = tqdm(
        total=config.steps, initial=state.step, desc=recipe.desc, disable=not progress, unit="step"
    )
    steps_this_call = 0
    while state.step < config.steps:
        pos, visits = stream.batch(state.step)
        rows = torch.as_tensor(positions[pos])
        ts, noises = zip(
            *(
                visit_noise(seed, int(i), int(v), shape, schedule.num_train_timesteps)
                for i, v in zip(ids[pos], visits, strict=True)
            ),
            strict=True,
        )
        t = torch.tensor(ts, device=device)
        noise = torch.stack(noises).to(device)
        x0 = dataset.images[rows].to(device)
        xt = schedule.add_noise(x0, noise, t)
        cond = () if conditioning is None else (conditioning[rows].to(device),)
        loss = F.mse_loss(model(xt, t, *cond).sample, schedule.target(x0, noise, t))
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        if state.ema is not None:
            state.ema.step(model.parameters())
        state.step += 1
        steps_this_call += 1
        bar.update(1)
        if state.step % recipe.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if state.step % config.checkpoint_every == 0 or state.step == config.steps:
            _save_checkpoint(state, recipe, out_dir, meta)
            if not config.keep_checkpoints:
                for _step, path in checkpoints(out_dir)[:-1]:
                    shutil.rmtree(path, ignore_errors=True)
        if stop_after is not None and steps_this_call >= stop_after:
            bar.close()
            return out_dir / "model"
    bar.close()
    with atomic_directory(out_dir / "model") as tmp:
        final = recipe.save_final(state, tmp)
    atomic_write_json(
        manifest_path,
        {
            **meta,
            "steps_done": state.step,
            "model_fingerprint": model_fingerprint(final),
            "seconds": round(time.time() - t0, 2),
        },
    )
    return out_dir / "model"


def _check_same_run(found: dict[str, Any], wanted: dict[str, Any], where: Path) -> None:
    for key in ("config", "dataset_fingerprint", "subset_hash"):
        if found.get(key) != wanted[key]:
            raise CheckpointError(
                f"{where} belongs to a training run with a different {key.replace('_', ' ')}",
                hint="use another --out directory, or delete the old run",
            )


def checkpoint_models(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, EMA model directory) for every saved checkpoint (used by TracIn-style methods)."""
    return [(step, path / "ema") for step, path in checkpoints(Path(out_dir))]
