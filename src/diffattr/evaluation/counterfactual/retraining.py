"""Retraining without a removal set, then regenerating the targets' seeds: picklable jobs for
the executor's workers, content-addressed by what they remove (:func:`removal_key`) and
resumable through their images files."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffattr.fsio import atomic_write_json, atomic_write_npz

if TYPE_CHECKING:
    from diffattr.diffusion.training import TrainConfig


@dataclass
class RetrainJob:
    """One retraining without the training positions ``removed``, then regenerations of
    ``seeds`` (each alone); picklable for worker processes."""

    data: dict[str, Any]
    train: dict[str, Any]
    removed: np.ndarray
    out_dir: str
    seeds: list[int]
    sampler: str
    num_steps: int
    model_dir: str | None = None  # no retraining: regenerate with this model (the run's)
    family: str = "unconditional"  # the run's model family: how to retrain and regenerate


def images_file(out_dir: str | Path, sampler: str, num_steps: int) -> Path:
    return Path(out_dir) / f"images-{sampler}{num_steps}.npz"


def _read_images(path: Path) -> dict[int, np.ndarray]:
    if not path.is_file():
        return {}
    with np.load(path) as z:
        images, seeds = z["images"], z["seeds"]
    return {int(s): images[i] for i, s in enumerate(seeds)}


def retrain_job_finished(job: RetrainJob) -> bool:
    """Whether the job's images file already holds every seed it asks for."""
    have = _read_images(images_file(job.out_dir, job.sampler, job.num_steps))
    return all(int(s) in have for s in job.seeds)


def run_retrain_job(job: RetrainJob) -> str:
    """Retrain (resuming) and regenerate the seeds not yet in the job's images file."""
    from diffattr.families import get_family

    path = images_file(job.out_dir, job.sampler, job.num_steps)
    have = _read_images(path)
    missing = [int(s) for s in job.seeds if int(s) not in have]
    if not missing:
        return str(path)
    out = Path(job.out_dir)
    family = get_family(job.family)
    config = replace(family.config_from_dict(job.train), keep_checkpoints=False)
    if job.model_dir is not None:
        model_dir = Path(job.model_dir)
    else:
        dataset = family.retrain_set(job.data)
        removed = np.asarray(job.removed, dtype=np.int64)
        keep = np.setdiff1d(np.arange(len(dataset)), removed)
        if not (out / "job.json").is_file():
            removed_ids = dataset.ids[torch.as_tensor(removed)].tolist()
            atomic_write_json(out / "job.json", {"removed_ids": removed_ids, "kept": len(keep)})
        model_dir = family.train_model(dataset, config, out, keep)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    model = family.load_trained(config, model_dir)
    images = family.regenerate(model, job.data, config, missing, job.sampler, job.num_steps)
    have.update(zip(missing, images, strict=True))
    seeds = np.array(sorted(have), dtype=np.int64)
    stacked = np.stack([have[int(s)] for s in seeds])
    atomic_write_npz(path, seeds=seeds, images=stacked)
    return str(path)


def removal_key(removed_ids: np.ndarray, train_config: TrainConfig, dataset_fp: str) -> str:
    """Names a retraining: sha256 of the sorted removed ids, weight settings and data."""
    h = hashlib.sha256(b"diffattr-counterfactual-v1\0")
    h.update(np.sort(np.asarray(removed_ids, dtype=np.int64)).astype("<i8").tobytes())
    h.update(json.dumps(train_config.weights_key(), sort_keys=True).encode())
    h.update(dataset_fp.encode())
    return h.hexdigest()[:16]
