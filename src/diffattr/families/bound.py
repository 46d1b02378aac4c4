"""A run opened by its family: the one place a command scores methods on a run.

``family.open(run)`` (or :func:`open_run`) returns a :class:`BoundRun` holding the run's model,
training set and noise schedule, each loaded on first use and then shared by every method the
command scores (a ``score --method das,dtrak,trak`` loads the model once). It is also the one
place where

- a method's options are resolved: the options given over the defaults the method takes from
  the command's context (``Method.context_defaults``: the run directory, and the noise seed of
  the feature settings), so ``score``, ``counterfactual``, ``lds eval`` and the kernel caches
  give a method the same defaults;
- a method is checked against what the family provides;
- an :class:`~diffattr.attribution.attributor.Attributor` is built (features in
  ``RUN/features``; the family's default parameter set; the family's checks of the model);
- targets are loaded (once per spec; as trajectories for methods that need them).
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from diffattr.attribution.attributor import Attributor
    from diffattr.attribution.methods import Method
    from diffattr.run import RunDir


class BoundRun:
    """``family`` (a :class:`~diffattr.families.Family`) bound to ``run`` (module
    docstring)."""

    def __init__(self, family: Any, run: RunDir) -> None:
        self.family, self.run = family, run
        self._targets: dict[str, tuple[str, Any, np.ndarray]] = {}

    @cached_property
    def model(self) -> Any:
        """The attributed model (loaded once)."""
        return self.family.model(self.run)

    @cached_property
    def train_set(self) -> Any:
        """The training set as the engine attributes it (loaded once)."""
        return self.family.train_set(self.run)

    @cached_property
    def schedule(self) -> Any:
        """The model's noise process."""
        return self.family.schedule(self.run)

    def method(
        self, name: str, given: dict[str, Any] | None = None, settings: Any = None
    ) -> Method:
        """Method ``name`` with the ``given`` options over the defaults it takes from this run
        and ``settings`` (:func:`~diffattr.attribution.methods.resolve_method`); refused
        (naming the option, or what the family lacks) before anything is loaded."""
        from diffattr.attribution.methods import method_context, resolve_method

        method = resolve_method(name, dict(given or {}), method_context(settings, self.run.path))
        self.family.check_method(method)
        return method

    def attributor(
        self,
        name: str,
        given: dict[str, Any] | None = None,
        settings: Any = None,
        **kwargs: Any,
    ) -> Attributor:
        """An attributor of method ``name`` on the run (``kwargs``: λ, batch size, device,
        progress, on_nonfinite, executor)."""
        from diffattr.attribution.attributor import Attributor
        from diffattr.attribution.features.featurize import FeatureSettings

        method = self.method(name, given, settings)
        att = Attributor(
            self.model,
            self.train_set,
            self.run.features_dir,
            method=name,
            schedule=self.schedule,
            settings=self.family.feature_settings(self.run, settings or FeatureSettings()),
            options=method.options,
            **kwargs,
        )
        self.family.check_attributor(self.run, att)
        return att

    def targets(self, spec: str, method: Method | None = None) -> tuple[str, Any, np.ndarray]:
        """(name, targets as ``method`` takes them, ids) of ``spec`` (``samples``, ``val``, a
        samples file, images): generated samples with their seeds for a method that needs
        trajectories, else the family's targets; each loaded once."""
        from diffattr.attribution.methods import TRAJECTORIES

        if spec not in self._targets:
            self._targets[spec] = self.family.targets(self.run, spec)
        name, targets, ids = self._targets[spec]
        if method is not None and TRAJECTORIES in method.requirements():
            return name, self.family.trajectory_targets(self.run, spec), ids
        return name, targets, ids

    def heldout(self, spec: str) -> tuple[Any, np.ndarray]:
        """(held-out images as the attributor takes them, their ids): κ's reference."""
        _, images, ids = self.targets("val" if spec != "val" else spec)
        return images, np.asarray(ids)
