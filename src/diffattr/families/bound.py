"""A run opened by its family: the one place a command scores methods on a run.

``family.open(run)`` (or :func:`~diffattr.families.registry.open_run`) returns a
:class:`BoundRun` holding the run's model, training set and noise schedule, each loaded on
first use and then shared by every method the command scores (a ``score --method
das,dtrak,trak`` loads the model once). It is also the one
place where

- a method's options are resolved: the options given over the defaults the method takes from
  the command's context (``Method.context_defaults``: the run directory, and the noise seed of
  the feature settings), so ``score``, ``counterfactual``, ``lds eval`` and the kernel caches
  give a method the same defaults;
- a method is checked against what the family provides;
- an :class:`~diffattr.attribution.attributor.Attributor` is built (features in
  ``RUN/features``; the family's default parameter set; the family's checks of the model);
- targets are loaded (once per spec; as trajectories for methods that need them);
- methods are scored: :meth:`BoundRun.score` (``score``, ``counterfactual``: targets by spec,
  featurized on an executor where given, screened, with κ's held-out reference),
  :meth:`BoundRun.score_grid` (``lds eval``: a λ grid on a benchmark's targets, in the Gram
  form of its kernel cache), :meth:`BoundRun.index` (``index``, ``query``: the kernel and κ's
  reference precomputed, :mod:`~diffattr.families.index`) and :meth:`BoundRun.featurize` /
  :meth:`BoundRun.featurize_targets` (``featurize``, the kernel caches). No caller outside the
  families builds an Attributor.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from diffattr.attribution.attributor import Attributor
    from diffattr.attribution.features.store import FeatureStore
    from diffattr.attribution.methods import Method
    from diffattr.attribution.scores import Scores
    from diffattr.families.index import AttributionIndex
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

    def targets(
        self, spec: str, method: Method | None = None, cache: bool = True
    ) -> tuple[str, Any, np.ndarray]:
        """(name, targets as ``method`` takes them, ids) of ``spec`` (``samples``, ``val``, a
        samples file, images): generated samples with their seeds for a method that needs
        trajectories, else the family's targets; each loaded once (``cache``; a spec read
        once, e.g. an upload's temporary folder, is not kept)."""
        from diffattr.attribution.methods import TRAJECTORIES

        if spec in self._targets:
            name, targets, ids = self._targets[spec]
        else:
            name, targets, ids = self.family.targets(self.run, spec)
            if cache:
                self._targets[spec] = (name, targets, ids)
        if method is not None and TRAJECTORIES in method.requirements():
            return name, self.family.trajectory_targets(self.run, spec), ids
        return name, targets, ids

    def heldout(self) -> tuple[Any, np.ndarray]:
        """(held-out images as the attributor takes them, their ids): κ's reference (the same
        object as the ``val`` targets, which then are their own reference)."""
        _, images, ids = self.targets("val")
        return images, np.asarray(ids)

    def _featurize_in_shards(
        self, att: Attributor, name: str, executor: Any, rows: Any, worker_device: str | None
    ) -> FeatureStore:
        """``att``'s training store (or its ``rows``) filled by shards on ``executor``, the
        workers loading the run as :func:`~diffattr.families.registry.load_for_worker` does."""
        from diffattr.attribution.features.shards import featurize_with_executor
        from diffattr.families.registry import load_for_worker

        return featurize_with_executor(
            att, self.run.path, name, executor, load_for_worker, rows, att.method.options,
            device=worker_device,
        )  # fmt: skip

    # ------------------------------------------------------------------ the scoring service
    def score(
        self,
        name: str,
        given: dict[str, Any] | None,
        spec: str,
        settings: Any = None,
        screen: Any = None,
        executor: Any = None,
        worker_device: str | None = None,
        heldout: bool = True,
        **kwargs: Any,
    ) -> Scores:
        """Scores of targets ``spec`` by method ``name``: its training features computed in
        shards on ``executor`` where given (unless a screen restricts them; the kernel's
        tiles too), each target restricted to its ``screen`` candidates where given, and with
        ``heldout`` κ's reference among the run's held-out images (``kwargs``: λ, batch
        size, device, progress, on_nonfinite)."""
        att = self.attributor(name, given, settings, **kwargs)
        _, targets, ids = self.targets(spec, att.method)
        if executor is not None:
            att.executor = executor
            if screen is None and att.method.uses_stored_features():
                self._featurize_in_shards(att, name, executor, None, worker_device)
        scores = att.score(targets, ids, screen=screen)  # checks the targets' shape first
        if heldout:
            images, heldout_ids = self.heldout()
            if len(heldout_ids):
                att.compare_to_heldout(scores, targets, images, screen, False, heldout_ids)
        return scores

    def index(
        self,
        name: str,
        given: dict[str, Any] | None = None,
        settings: Any = None,
        screen: Any = None,
        build: bool = True,
        **kwargs: Any,
    ) -> AttributionIndex:
        """The run's index of method ``name`` (:mod:`~diffattr.families.index`): loaded when
        one with the same inputs exists, else built (``build``) or refused."""
        from diffattr.families.index import AttributionIndex

        return AttributionIndex.open(self, name, given, settings, screen, build, **kwargs)

    def describe(
        self, name: str, given: dict[str, Any] | None, settings: Any = None, **kwargs: Any
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """(the feature settings the method's scores would record, None for methods without
        stored features; its options as resolved): what saved scores must match to be
        reused."""
        from diffattr.attribution.methods import method_meta

        att = self.attributor(name, given, settings, **kwargs)
        features = att.settings.to_dict() if att.method.measure is not None else None
        return features, method_meta(att.method)["options"]

    def score_grid(
        self,
        name: str,
        given: dict[str, Any] | None,
        settings: Any,
        images: torch.Tensor,
        keys: np.ndarray,
        seeds: np.ndarray | None,
        gram: dict[str, Any] | None,
        grid: list[Any],
        **kwargs: Any,
    ) -> list[np.ndarray]:
        """Scores of a benchmark's targets (``images``, ``keys``, generation ``seeds``) per λ
        rule of ``grid``, for a method that computes features from the model: in the Gram
        form ``gram`` of its measure's kernel cache where given (its training features too,
        e.g. Journey-TRAK's trajectories against TRAK's kernel), else from its own."""
        att = self.attributor(name, given, settings, **kwargs)
        fields: dict[str, Any] = {"target_seeds": seeds}
        if gram is not None:
            fields.update(gram, train_features=att.featurize().features)
        else:
            fields["settings"] = settings
        inputs = att.inputs(images, images, keys).updated(**fields)
        return att.method.score_grid(inputs, grid)

    def featurize(
        self,
        name: str,
        given: dict[str, Any] | None = None,
        settings: Any = None,
        rows: np.ndarray | None = None,
        executor: Any = None,
        worker_device: str | None = None,
        **kwargs: Any,
    ) -> FeatureStore | None:
        """The training set's feature store of method ``name`` (its ``rows`` only, if given),
        computed or finished — in shards on ``executor`` where given; None for methods
        without stored features."""
        att = self.attributor(name, given, settings, **kwargs)
        if att.method.measure is None:
            return None
        if executor is None:
            return att.featurize(rows)
        return self._featurize_in_shards(att, name, executor, rows, worker_device)

    def featurize_targets(
        self,
        name: str,
        given: dict[str, Any] | None,
        settings: Any,
        targets: str | tuple[torch.Tensor, np.ndarray, torch.Tensor | None],
        **kwargs: Any,
    ) -> FeatureStore | None:
        """The feature store of targets — a spec (``samples``, ``val``, a file or folder) or
        (images, ids, conditioning) — by method ``name``; None for methods without stored
        features."""
        att = self.attributor(name, given, settings, **kwargs)
        if att.method.measure is None:
            return None
        if isinstance(targets, str):
            _, given_targets, ids = self.targets(targets, att.method)
            cond = getattr(given_targets, "conditioning", None)
            images = getattr(given_targets, "images", given_targets)
        else:
            images, ids, cond = targets
        return att.featurize_targets(images, ids, cond)
