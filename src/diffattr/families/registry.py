"""The registry of model families: ``run.json``'s ``family`` → the class that serves it,
imported on first use; the family of a run, a run opened by its family, and what a featurizing
worker loads. Apart from :mod:`diffattr.families` (which re-exports it) so that
:mod:`~diffattr.families.bound` can use it without importing the package."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from diffattr.errors import DiffattrError
from diffattr.run import UNCONDITIONAL, RunDir

#: Family name (``run.json``'s ``family``) → ``module:factory`` (a callable without arguments
#: returning the family: a modality holding a weights source), imported on first use.
REGISTRY: dict[str, str] = {
    UNCONDITIONAL: "diffattr.families.pixel:PixelFamily",
    "text2image": "diffattr.families.text2image:TextToImageFamily",
    "diffusers": "diffattr.families.imported:diffusers_family",
    "diffusers-text2image": "diffattr.families.imported_text2image:text2image_diffusers_family",
}
_LOADED: dict[str, Any] = {}


def get_family(name: str) -> Any:
    """The registered family ``name`` (a :class:`~diffattr.families.Family`)."""
    if name not in _LOADED:
        if name not in REGISTRY:
            raise DiffattrError(
                f"unknown model family {name!r}", hint=f"known: {', '.join(sorted(REGISTRY))}"
            )
        module, _, cls = REGISTRY[name].partition(":")
        _LOADED[name] = getattr(importlib.import_module(module), cls)()
    return _LOADED[name]


def family_of(run: RunDir) -> Any:
    """The family of ``run`` (a run without run.json is reported by the step needing it)."""
    if not run.path.is_dir():
        raise DiffattrError(
            f"run directory {run.path} does not exist",
            hint="make one with `diffattr train`, `diffattr finetune` or `diffattr import`",
        )
    return get_family(run.family)


def open_run(run: RunDir | str | Path) -> Any:
    """The run at ``run`` opened by its family (:class:`~diffattr.families.bound.BoundRun`)."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    return family_of(run).open(run)


def load_for_worker(run_path: str) -> tuple[torch.nn.Module, Any, Any]:
    """(model, training set, schedule) of a run, for a featurizing worker
    (:class:`~diffattr.attribution.features.shards.ShardJob`'s ``loader``)."""
    run = RunDir(run_path)
    family = family_of(run)
    return family.model(run), family.train_set(run), family.schedule(run)
