"""Featurize a set of images into a :class:`FeatureStore`: gradients → projection → rows.

Resumable: only rows whose done flag is unset are computed; a killed run continues where it
stopped and ends with exactly the features of an uninterrupted run (every row depends only on
the sample, the settings and the model).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffattr.attribution.gradients import GradientComputer, TimestepSpec, select_parameters
from diffattr.attribution.measure import parse_measure
from diffattr.attribution.projection import Projector, make_projector
from diffattr.attribution.store import FeatureStore
from diffattr.diffusion.presets import model_fingerprint
from diffattr.diffusion.schedule import NoiseSchedule
from diffattr.errors import ConfigError

#: Full per-sample gradients are stored unprojected (exact kernel) up to this many bytes.
DEFAULT_MAX_EXACT_BYTES = 4 * 2**30
DEFAULT_PROJECTION = ("countsketch", 32768)


@dataclass(frozen=True)
class FeatureSettings:
    """Everything that determines a feature row besides the model and the image."""

    measure: str = "das"
    timesteps: int = 10
    timestep_strategy: str = "uniform"
    normalize: bool = True
    noise_seed: int = 0
    params: str | None = None
    projector: str = "auto"
    proj_dim: int | None = None
    proj_seed: int = 0

    def timestep_spec(self) -> TimestepSpec:
        return TimestepSpec(self.timesteps, self.timestep_strategy, self.noise_seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key(self) -> str:
        """Short stable hash naming a store directory for these settings."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    def resolved(self, num_params: int, num_train: int, max_exact_bytes: int) -> FeatureSettings:
        """Settle ``projector="auto"``: exact (identity) when N·p·4 bytes fit, else a sketch."""
        if self.projector != "auto":
            return self
        if num_train * num_params * 4 <= max_exact_bytes:
            return replace(self, projector="identity", proj_dim=None)
        kind, dim = DEFAULT_PROJECTION
        return replace(self, projector=kind, proj_dim=self.proj_dim or min(dim, num_params - 1))


def build_projector(settings: FeatureSettings, num_params: int, device: str) -> Projector:
    if settings.projector == "auto":
        raise ConfigError("resolve the 'auto' projector before building it")
    return make_projector(
        settings.projector, num_params, settings.proj_dim, seed=settings.proj_seed, device=device
    )


def featurize(
    model: torch.nn.Module,
    images: torch.Tensor,
    ids: np.ndarray,
    store_dir: str | Path,
    settings: FeatureSettings,
    schedule: NoiseSchedule,
    data_fingerprint: str,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "featurize",
    rows: np.ndarray | None = None,
    source: FeatureStore | None = None,
) -> FeatureStore:
    """Compute φ for every image (or the given ``rows``) not yet in the store at ``store_dir``.

    ``source``: a complete unprojected (identity) store of the same model, measure, timesteps
    and images; its rows ḡ are projected (φ = Pᵀḡ, exact since projection is linear) instead
    of recomputing gradients.
    """
    if settings.projector == "auto":
        raise ConfigError("resolve the 'auto' projector (FeatureSettings.resolved) first")
    ids = np.asarray(ids, dtype=np.int64)
    measure = parse_measure(settings.measure, tuple(images.shape[1:]))
    param_names = select_parameters(model, settings.params)
    computer = GradientComputer(
        model,
        measure,
        schedule,
        settings.timestep_spec(),
        noise_seed=settings.noise_seed,
        normalize=settings.normalize,
        param_names=param_names,
        device=device,
    )
    projector = build_projector(settings, computer.dim, device)
    store_settings = {
        "features": settings.to_dict(),
        "projector": projector.describe(),
        "measure": measure.describe(),
        "schedule": schedule.to_dict(),
        "model_fingerprint": model_fingerprint(model),
        "data_fingerprint": data_fingerprint,
        "num_params": computer.dim,
        "ids": ids.tolist(),
    }
    store = FeatureStore.open(store_dir, store_settings, len(ids), projector.output_dim)
    if source is not None and not _same_gradients(source, store_settings):
        source = None
    todo = store.missing_rows()
    if rows is not None:
        todo = np.intersect1d(todo, np.asarray(rows, dtype=np.int64))
    if todo.size == 0:
        return store
    with store.lock():
        bar = tqdm(total=todo.size, desc=desc, unit="img", disable=not progress)
        for s in range(0, todo.size, batch_size):
            batch = todo[s : s + batch_size]
            if source is not None:
                g = torch.from_numpy(np.asarray(source.features[batch]))
                err = torch.from_numpy(source.column("error")[batch])
                res = torch.from_numpy(source.column("residual")[batch])
            else:
                g, err, res = computer.compute(images[torch.as_tensor(batch)], ids[batch])
            phi = projector.project(g).cpu().numpy()
            store.write_rows(batch, phi, error=err.numpy(), residual=res.numpy())
            bar.update(batch.size)
        bar.close()
    return store


def _same_gradients(source: FeatureStore, wanted: dict[str, Any]) -> bool:
    """Whether ``source`` holds the unprojected rows of the gradients ``wanted`` describes."""
    have = source.settings
    if not source.is_complete() or have["projector"].get("kind") != "identity":
        return False
    keys = ("measure", "schedule", "model_fingerprint", "data_fingerprint", "num_params", "ids")
    if any(have.get(k) != wanted.get(k) for k in keys):
        return False
    mine = {k: v for k, v in wanted["features"].items() if not k.startswith("proj")}
    theirs = {k: v for k, v in have["features"].items() if not k.startswith("proj")}
    return mine == theirs


def identity_settings(settings: FeatureSettings) -> FeatureSettings:
    """The unprojected version of ``settings`` (whose store can feed any projection)."""
    return replace(settings, projector="identity", proj_dim=None, proj_seed=0)
