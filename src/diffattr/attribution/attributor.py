"""The user-facing object: featurize a training set once, then score any targets.

attributor = Attributor(model, train_set, store_dir="runs/x/features", method="das")
attributor.featurize()
scores = attributor.score(generated_images)
ids, values = scores.top_k(8)
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.attribution.features.featurize import (
    DEFAULT_MAX_EXACT_BYTES,
    FeatureSettings,
    featurize,
    identity_settings,
    with_available_projector,
)
from diffattr.attribution.features.gradients import resolve_device, select_parameters
from diffattr.attribution.features.store import FeatureStore
from diffattr.attribution.inputs import ScoreInputs, as_images, images_fingerprint
from diffattr.attribution.kernel import Kernel, dual_gram, inner_products
from diffattr.attribution.kernel.ridge import Ridge
from diffattr.attribution.methods import Method, get_method, method_meta
from diffattr.attribution.scores import Scores
from diffattr.attribution.scores.names import Names
from diffattr.attribution.screening import (
    Screen,
    candidate_rows,
    check_screenable,
    restrict,
    screened_scores,
    similarity_scores,
)
from diffattr.data import ImageDataset
from diffattr.diffusion.schedule import NoiseSchedule
from diffattr.errors import DataError


class Attributor:
    """Attribute images of ``model`` to the training set ``train`` with one method."""

    def __init__(
        self,
        model: torch.nn.Module,
        train: ImageDataset,
        store_dir: str | Path,
        method: str = "das",
        schedule: NoiseSchedule | None = None,
        settings: FeatureSettings | None = None,
        lam: float | Ridge | None = None,
        batch_size: int = 32,
        device: str = "cpu",
        progress: bool = True,
        max_exact_bytes: int = DEFAULT_MAX_EXACT_BYTES,
        on_nonfinite: str = "stop",
        executor: Any = None,
        options: dict[str, Any] | None = None,
        **method_options: Any,
    ) -> None:
        """``method_options`` (or the mapping ``options``, for option names this constructor
        also has, e.g. ekfac's ``train``) configure the method."""
        self.model = model
        self.train = train
        self.store_dir = Path(store_dir)
        self.method: Method = get_method(method, **{**(options or {}), **method_options})
        self.schedule = schedule or NoiseSchedule()
        #: λ of kernel methods: absolute, a :class:`Ridge` rule, or None for the method's
        #: own default (``Method.default_ridge``).
        self.lam = lam
        self.batch_size, self.progress = batch_size, progress
        self.device = resolve_device(device)
        self.on_nonfinite = on_nonfinite
        base = settings or FeatureSettings()
        if self.method.measure is not None:
            base = replace(base, measure=self.method.measure)
        num_params = sum(
            dict(model.named_parameters())[n].numel() for n in select_parameters(model, base.params)
        )
        self.settings = with_available_projector(
            base.resolved(num_params, len(train), max_exact_bytes), self.device
        )
        self._kernel: Kernel | None = None
        self._train_store: FeatureStore | None = None
        #: :mod:`diffattr.parallel` executor for the kernel's training-tile products.
        self.executor = executor
        #: Where target features are stored (None: ``store_dir``; an index's queries keep
        #: theirs out of the run, in a temporary directory).
        self.target_store_dir: Path | None = None

    def _store_path(self, role: str, settings: FeatureSettings | None = None) -> Path:
        settings = settings or self.settings
        root = self.store_dir
        if role.startswith("targets") and self.target_store_dir is not None:
            root = self.target_store_dir
        return root / f"{role}-{settings.measure}-{settings.key()}"

    @property
    def train_store_path(self) -> Path:
        """Directory of the training features' store (which may not exist yet)."""
        return self._store_path("train")

    def _identity_source(self, role: str) -> FeatureStore | None:
        """A complete unprojected store to project from, if one exists (no recomputation)."""
        if self.settings.projector == "identity":
            return None
        path = self._store_path(role, identity_settings(self.settings))
        if not (path / "meta.json").is_file():
            return None
        store = FeatureStore.load(path, require_complete=False)
        return store if store.is_complete() else None

    def featurize(self, rows: np.ndarray | None = None) -> FeatureStore | None:
        """Compute (or finish) the training features; None for image-based methods.

        ``rows``: only these rows (positions), e.g. one worker's share of the training set.
        """
        if self.method.measure is None:
            return None
        if rows is not None or self._train_store is None or not self._train_store.is_complete():
            store = featurize(
                self.model,
                self.train.images,
                self.train.ids.numpy(),
                self._store_path("train"),
                self.settings,
                self.schedule,
                self.train.fingerprint(),
                batch_size=self.batch_size,
                device=self.device,
                progress=self.progress,
                desc=f"featurize train ({self.settings.measure})",
                rows=rows,
                source=self._identity_source("train"),
                on_nonfinite=self.on_nonfinite,
                conditioning=getattr(self.train, "conditioning", None),
            )
            if rows is not None:
                return store
            self._train_store = store
        return self._train_store

    def featurize_targets(
        self, images: torch.Tensor, ids: np.ndarray, conditioning: torch.Tensor | None = None
    ) -> FeatureStore:
        """Compute the target features (stored, keyed by the target images and conditioning:
        the caption embeddings of a text-to-image model's targets)."""
        fp = images_fingerprint(images, ids, conditioning)
        role = f"targets-{fp[:10]}"
        return featurize(
            self.model,
            images,
            ids,
            self._store_path(role),
            self.settings,
            self.schedule,
            fp,
            batch_size=self.batch_size,
            device=self.device,
            progress=self.progress,
            desc=f"featurize targets ({self.settings.measure})",
            source=self._identity_source(role),
            on_nonfinite=self.on_nonfinite,
            conditioning=conditioning,
        )

    def use_kernel(self, kernel: Kernel, store: FeatureStore) -> None:
        """Score with ``kernel`` (fitted on ``store``, the complete training features, e.g. by
        an index) instead of fitting one."""
        self._kernel, self._train_store = kernel, store

    def kernel(self) -> Kernel:
        if self._kernel is None:
            store = self.featurize()
            assert store is not None
            self._kernel = Kernel.fit(store.features, self.method.lambda_rule(self.lam))
        self._kernel.executor = self.executor
        return self._kernel

    def inputs(self, targets: Any, images: torch.Tensor, ids: np.ndarray) -> ScoreInputs:
        """:class:`ScoreInputs` of ``targets`` (their ``images`` and ``ids``) with this
        attributor's context: model, schedule, settings, store, λ, and a ``scorer`` that scores
        the same targets with another method or model (ensembles, combinations)."""

        def scorer(method: str, options: dict[str, Any], model=None, store_dir=None, lam=None):
            member = Attributor(
                self.model if model is None else model, self.train,
                self.store_dir if store_dir is None else store_dir, method=method,
                schedule=self.schedule, settings=self.settings, lam=lam,
                batch_size=self.batch_size, device=self.device, progress=self.progress,
                options=options,
            )  # fmt: skip
            return member.score(targets, ids).values

        return ScoreInputs.of(
            train_images=self.train.images,
            target_images=images,
            train_conditioning=getattr(self.train, "conditioning", None),
            target_conditioning=getattr(targets, "conditioning", None),
            num_train=len(self.train),
            num_targets=images.shape[0],
            train_ids=self.train.ids.numpy(),
            target_ids=np.asarray(ids, dtype=np.int64),
            targets=targets,
            model=self.model,
            schedule=self.schedule,
            settings=self.settings,
            store_dir=self.store_dir,
            lam=self.lam,
            batch_size=self.batch_size,
            device=self.device,
            progress=self.progress,
            scorer=scorer,
        )

    def score(
        self,
        targets: Any,
        target_ids: np.ndarray | None = None,
        screen: Screen | None = None,
        heldout: Any = None,
    ) -> Scores:
        """Scores (targets × training samples) for images, a dataset or generated samples.

        Targets with a ``conditioning`` attribute (a text-to-image ``LatentSet``: latents and
        caption embeddings) are featurized with it, as the training set is with its own.

        ``screen``: score each target on its ``screen.size`` most similar training images only
        (:mod:`.screening`); the others are NaN, and only the union of the candidates is
        featurized (rows a later unscreened run reuses).

        ``heldout``: real images not trained on, as a dataset of the training set's kind (a
        run's held-out ``ImageDataset``, ``run.data_spec().load()[1]``; for text-to-image,
        the ``LatentSet`` of ``family.targets(run, "val")``); with them the scores also carry
        each target's κ relative to theirs and the near-copy check
        (:meth:`compare_to_heldout`).
        """
        scores = self._score(targets, target_ids, screen)
        if heldout is not None:
            self.compare_to_heldout(scores, targets, heldout, screen)
        return scores

    def compare_to_heldout(
        self, scores: Scores, targets: Any, heldout: Any, screen: Screen | None = None,
        near_copy: bool = True, heldout_ids: np.ndarray | None = None,
    ) -> Scores:  # fmt: skip
        """Record in ``scores`` (of ``targets``) what held-out real images tell about them.

        ``heldout``: a dataset of the training set's kind, or images with ``heldout_ids``.
        κ reference: the first :data:`~.confidence.HELDOUT_REFERENCE` held-out images scored
        the same way (the targets' own κ when ``targets`` is ``heldout``), so that
        :meth:`Scores.confidence_percentiles` reads "more concentrated than p% of held-out
        images"; none for methods scoring generated targets' trajectories or whose targets each
        cost a fine-tuning (``Method.heldout_reference``). ``near_copy``: the
        targets' near-copy check in the attributor's space (pixels; latents for
        text-to-image), skipped for the held-out images themselves.
        """
        from diffattr.attribution.methods import TRAJECTORIES
        from diffattr.attribution.scores.confidence import HELDOUT_REFERENCE, near_copies

        cap = min(HELDOUT_REFERENCE, len(heldout))
        if targets is heldout:
            scores.set_confidence_reference(scores.confidence()[:cap], scores.target_ids[:cap])
            return scores
        if self.method.heldout_reference and TRAJECTORIES not in self.method.requirements():
            scores.set_confidence_reference(*self.heldout_confidence(heldout, heldout_ids, screen))
        if near_copy:
            images, _ = as_images(targets, scores.target_ids)
            scores.set_near_copies(near_copies(images, self.train, heldout))
        return scores

    def heldout_confidence(
        self, heldout: Any, heldout_ids: np.ndarray | None = None, screen: Screen | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(κ, ids) of the first :data:`~.confidence.HELDOUT_REFERENCE` held-out images scored
        as targets: κ's reference (:meth:`compare_to_heldout`)."""
        from diffattr.attribution.scores.confidence import HELDOUT_REFERENCE

        ref, ref_ids = _first(heldout, heldout_ids, min(HELDOUT_REFERENCE, len(heldout)))
        return self.score(ref, ref_ids, screen).confidence(), np.asarray(ref_ids)

    @contextmanager
    def temporary_target_store(self) -> Iterator[None]:
        """Within the block, target features are stored in a temporary directory (removed at
        its end), so that answering leaves the run's feature directory unchanged."""
        with tempfile.TemporaryDirectory(prefix="diffattr-targets-") as tmp:
            self.target_store_dir = Path(tmp)
            try:
                yield
            finally:
                self.target_store_dir = None

    def _score(self, targets: Any, target_ids: np.ndarray | None, screen: Screen | None) -> Scores:
        """:meth:`score` without the held-out comparison."""
        images, ids = as_images(targets, target_ids)
        if tuple(images.shape[1:]) != tuple(self.train.images.shape[1:]):
            raise DataError(
                f"target images are {tuple(images.shape[1:])}, the training images "
                f"{tuple(self.train.images.shape[1:])}"
            )
        inputs = self.inputs(targets, images, ids)
        if screen is not None:
            return self._score_screened(inputs, targets, screen)
        meta: dict[str, Any] = {}
        skipped_train = skipped_targets = np.zeros(0, dtype=np.int64)
        if self.method.measure is not None:
            store = self.featurize()
            assert store is not None
            skipped_train = store.skipped_rows()
            target_features = None
            if not self.method.needs_model:  # those compute their own target features
                cond = getattr(targets, "conditioning", None)
                tstore = self.featurize_targets(images, ids, cond)
                target_features = np.asarray(tstore.features)
                skipped_targets = tstore.skipped_rows()
            inputs = inputs.updated(
                train_features=store.features,
                target_features=target_features,
                train_error=store.column("error"),
                train_residual=store.column("residual"),
                kernel=self.kernel() if self.method.uses_kernel else None,
            )
            meta["features"] = self.settings.to_dict()
            if self.method.uses_kernel:
                meta["lambda"] = inputs.kernel.lam
                meta["lambda_rule"] = describe_lambda(self.lam, self.method)
                meta["kernel_form"] = inputs.kernel.form
        values = self.method.score(inputs)
        return self._scores(values, targets, ids, meta, skipped_train, skipped_targets)

    def _scores(
        self, values, targets, ids, meta, skipped_train, skipped_targets, unscored=None
    ) -> Scores:
        """:class:`Scores` of ``values``, those of samples skipped as non-finite set to 0 but
        for the ``unscored`` entries (NaN: outside a screen's candidates); with the training
        data's shape and size (``meta["train_data"]``, for the confidence calibration) and
        the names of the training images and targets."""
        if skipped_train.size or skipped_targets.size:
            values = _zero_skipped(values, skipped_train, skipped_targets, self.train, ids)
            if unscored is not None:
                values[unscored] = np.nan
            meta["skipped_train_ids"] = self.train.ids.numpy()[skipped_train].tolist()
            meta["skipped_target_ids"] = np.asarray(ids)[skipped_targets].tolist()
        meta.update(method_meta(self.method))
        meta["train_data"] = {"shape": list(self.train.shape), "count": len(self.train)}
        return Scores(
            values, self.train.ids.numpy(), ids, self.method.name, meta,
            train_names=Names.of(self.train), target_names=target_names(targets, ids),
        )  # fmt: skip

    def _score_screened(self, inputs: ScoreInputs, targets: Any, screen: Screen) -> Scores:
        """:meth:`score` restricted to each target's candidates (features of their union)."""
        check_screenable(self.method)
        similarity = similarity_scores(screen, inputs)
        candidates = candidate_rows(similarity, screen.count(inputs.num_train))
        union = np.arange(inputs.num_train) if screen.kernel == "all" else np.unique(candidates)
        ids = inputs.target_ids
        sub = restrict(inputs, union, np.arange(inputs.num_targets))
        meta: dict[str, Any] = {
            "screen": {
                **screen.describe(),
                "candidates": int(candidates.shape[1]),
                "union": int(union.size),
            }
        }
        skipped_train = skipped_targets = np.zeros(0, dtype=np.int64)
        dim = None
        if self.method.measure is not None:
            store = self.featurize(rows=union)
            assert store is not None
            phi = np.asarray(store.features[union])  # the union's rows only
            tstore = self.featurize_targets(
                inputs.target_images, ids, getattr(targets, "conditioning", None)
            )
            target_phi = np.asarray(tstore.features, dtype=np.float64)
            gram = dual_gram(phi)
            sub = sub.updated(
                train_gram=gram,
                target_inner=inner_products(target_phi, phi),
                train_sqnorm=np.diag(gram).copy(),
                target_sqnorm=np.einsum("ij,ij->i", target_phi, target_phi),
                train_error=store.column("error")[union],
                train_residual=store.column("residual")[union],
            )
            skipped_train = np.intersect1d(store.skipped_rows(), union)
            skipped_targets = tstore.skipped_rows()
            dim = store.dim
            meta["features"] = self.settings.to_dict()
        pos = np.searchsorted(union, candidates)
        values_u, lams = screened_scores(self.method, sub, pos, screen.kernel, self.lam, dim)
        values = np.full((inputs.num_targets, inputs.num_train), np.nan)
        values[:, union] = values_u
        if lams:
            meta["lambda"] = float(np.median(lams))
            meta["lambda_range"] = [float(min(lams)), float(max(lams))]
            meta["lambda_rule"] = describe_lambda(self.lam, self.method)
        unscored = np.isnan(values)
        return self._scores(values, targets, ids, meta, skipped_train, skipped_targets, unscored)


def _first(samples: Any, ids: np.ndarray | None, n: int) -> tuple[Any, np.ndarray]:
    """The first ``n`` of a dataset (its ids) or of images (``ids``, else positions)."""
    if hasattr(samples, "subset"):
        ref = samples.subset(np.arange(n))
        return ref, ref.ids.numpy()
    ids = np.arange(len(samples)) if ids is None else np.asarray(ids)
    return samples[:n], ids[:n]


def target_names(targets: Any, ids: np.ndarray) -> Names | None:
    """The names of ``targets`` (a dataset's sources, captions, groups; a text-to-image set's
    prompts), in the order of ``ids``; None for bare images or samples, which carry none."""
    if getattr(targets, "sources", None) is None and getattr(targets, "captions", None) is None:
        return None
    return Names.of(targets, ids)


def describe_lambda(lam: float | Ridge | None, method: Method) -> str:
    """How λ was chosen, as the scores' metadata records it (``effective-dim:200``, …)."""
    lam = method.lambda_rule(lam)
    return str(lam) if isinstance(lam, Ridge) else f"absolute:{float(lam):g}"


def _zero_skipped(values, train_rows, target_rows, train: ImageDataset, target_ids) -> np.ndarray:
    """Scores with the rows/columns of samples skipped as non-finite set to 0 (and a warning)."""
    from diffattr.errors import warn

    values = np.array(values, dtype=np.float64, copy=True)
    if train_rows.size:
        values[:, train_rows] = 0.0
        shown = ", ".join(str(int(i)) for i in train.ids.numpy()[train_rows][:20])
        warn(
            f"{train_rows.size} training sample(s) were skipped as non-finite when featurized "
            f"and score 0 (ids {shown}{' …' if train_rows.size > 20 else ''})"
        )
    if target_rows.size:
        values[target_rows, :] = 0.0
        shown = ", ".join(str(int(i)) for i in np.asarray(target_ids)[target_rows][:20])
        warn(f"{target_rows.size} target(s) were skipped as non-finite and score 0 (ids {shown})")
    return values
