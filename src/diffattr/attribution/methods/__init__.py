"""Scorers: turn stored features (or images) into attribution scores τ(x, zᵢ).

Kernel methods share K(x, i) = φ(x)ᵀ G⁻¹ φᵢ with G = ΦᵀΦ + λI (:mod:`.kernel`):

- ``das``    φ are gradients of the *output* ε_θ reduced to a scalar (measure ``das``);
             τ = K(x, i) · wᵢ / (1 − hᵢ)^[leverage], squared on request (the KL form).
             wᵢ per ``residual``: ``error`` (default) eᵢ / mean(e), the per-sample training error
             over timesteps normalised across samples; ``signed`` rᵢ / rms(r), the reduced
             residual mean(ε_θ − ε); ``raw`` rᵢ as stored; ``none`` 1. With ``raw`` residuals,
             leverage on and a linear model, τ is exactly the leave-one-out change of the
             target's prediction, φ(x)ᵀ(θ₋ᵢ − θ) (Sherman–Morrison).
- ``dtrak``  K(x, i) on gradients of ‖ε_θ‖² (D-TRAK).
- ``trak``   K(x, i) on gradients of the diffusion loss (TRAK).
Kernel-free baselines: ``grad-dot`` φ(x)ᵀφᵢ and ``grad-cos`` (cosine) on loss gradients;
``pixel-dot`` / ``pixel-cos`` on raw pixels; ``random`` (seeded N(0,1), the LDS null).
Further baselines (appended at the end of this module):
- ``relative-if`` K(x, i) / ‖G⁻¹φᵢ‖ and ``renormalized-if`` K(x, i) / ‖φᵢ‖ (loss gradients).
- ``embedding-cos`` cosine of image embeddings (in-domain autoencoder, or ``encoder=callable``).
- ``tracin`` Σ_c η_c φ_c(x)ᵀφ_c(zᵢ) and ``gas`` Σ_c η_c cos(φ_c(x), φ_c(zᵢ)) over checkpoints.
- ``journey-trak`` K(x, i) with φ(x) taken along x's own sampling trajectory (generated x).
- ``ensemble`` the mean of a method's scores over several models.
- ``ekfac`` K-FAC / EK-FAC influence through ``kronfluence`` (optional dependency).
- ``combine`` the mean of several methods' per-target standardised scores.
- ``abu`` / ``mucs`` attribution by unlearning the target (:mod:`.unlearning`).
Model-based baselines (``needs_model``) read the context fields of :class:`ScoreInputs`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from diffattr.attribution.inputs import ScoreInputs, require_inputs
from diffattr.attribution.kernel import Kernel, inner_products, row_norms
from diffattr.attribution.kernel.ridge import DEFAULT_RIDGE, Ridge
from diffattr.attribution.methods.options import (
    Option,
    documented_options,
    options_of_function,
    typed,
)
from diffattr.errors import ConfigError
from diffattr.seeding import derive_seed

#: What a method may need from a run's model family beyond the final model, its training set
#: and their features (a family lists what it ``provides``; see :mod:`diffattr.families`):
#: saved training checkpoints loadable as the model (TracIn, GAS); targets with recorded seeds
#: whose sampling can be replayed (Journey-TRAK); calls of the model on (x_t, t) alone, made by
#: the method itself (EK-FAC through kronfluence, ensembles of other trained models).
CHECKPOINTS, TRAJECTORIES, MODEL_CALLS = "checkpoints", "trajectories", "model-calls"
#: The model's training inputs — x_t, t and any per-sample conditioning (a text-to-image
#: model's caption embeddings) — for a method that calls the model and its loss itself under
#: the family's noise process (EK-FAC through kronfluence).
MODEL_INPUTS = "model-inputs"


@dataclass
class Method(ABC):
    """A registered attribution method, declaring what it needs.

    ``measure``: the features it scores (None: images or its own features); ``uses_kernel``:
    it solves G = ΦᵀΦ + λI; ``needs_model``: it computes features from the model itself (it
    reads the context fields of :class:`ScoreInputs`); ``needs``: what the run's model family
    must provide beyond that (:data:`CHECKPOINTS`, :data:`TRAJECTORIES`, :data:`MODEL_CALLS`);
    ``context_defaults``: options whose default comes from the caller's context (option name →
    context key, e.g. ``random``'s ``seed`` ← ``noise_seed``, ``tracin``'s ``checkpoints`` ←
    ``run_dir``).
    """

    name: ClassVar[str]
    measure: ClassVar[str | None] = None  # feature measure needed; None for image methods
    uses_kernel: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False  # computes its own features from models (context fields)
    needs: ClassVar[frozenset[str]] = frozenset()
    context_defaults: ClassVar[dict[str, str]] = {}
    #: The options it reads (``das[residual=…]``), typed (:mod:`.options`).
    declared_options: ClassVar[tuple[Option, ...]] = ()
    #: How λ is chosen when the user does not say (kernel methods; None: no kernel).
    default_ridge: ClassVar[Ridge | None] = None
    #: Whether `diffattr score` also scores held-out images as κ's reference by default (no
    #: for methods whose every target costs a fine-tuning: the unlearning methods).
    heldout_reference: ClassVar[bool] = True
    #: Whether its scores estimate each training image's effect on the target, so that a
    #: group's summed score estimates the group's (:mod:`~diffattr.attribution.scores.groups`).
    additive: ClassVar[bool] = False
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def uses_stored_features(cls) -> bool:
        """Whether it scores the features featurize stores for the training set (its measure's),
        which a screen can restrict and an executor can compute in shards."""
        return cls.measure is not None and not cls.needs_model

    @classmethod
    def image_only(cls) -> bool:
        """Whether it needs neither stored features nor the model: images alone (pixel,
        embedding, random)."""
        return cls.measure is None and not cls.needs_model

    @classmethod
    def option_specs(cls) -> tuple[Option, ...]:
        """The options this method takes, typed, with their defaults."""
        return cls.declared_options

    @classmethod
    def accepted_options(cls) -> set[str]:
        """Names of the options this method takes."""
        return {o.name for o in cls.option_specs()}

    @classmethod
    def options_from(cls, context: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        """``given`` options over the defaults this method takes from ``context``."""
        defaults = {k: context[key] for k, key in cls.context_defaults.items() if key in context}
        return {**defaults, **given}

    def components(self) -> list[tuple[str, dict[str, Any]]]:
        """The (method, options) a combination is made of; [] for a method of its own."""
        return []

    def requirements(self) -> frozenset[str]:
        """What the model family must provide (a combination: what its members need)."""
        return self.needs

    def takes_lambda(self) -> bool:
        """Whether the scores depend on λ (a kernel: its own, or its base method's)."""
        return self.uses_kernel

    def lambda_rule(self, lam: float | Ridge | None) -> float | Ridge | None:
        """``lam`` as given (absolute λ or a rule), or this method's default rule for None."""
        return self.default_ridge if lam is None else lam

    @abstractmethod
    def score(self, inputs: ScoreInputs) -> np.ndarray:
        """(T, N) float64 scores."""

    def score_grid(self, inputs: ScoreInputs, ridges: list[Any]) -> list[np.ndarray]:
        """Scores per λ rule in ``ridges`` (None: the default rule); one entry if λ-free."""
        if not self.takes_lambda():
            return [self.score(inputs)]
        return [self.score(replace(inputs, lam=ridge)) for ridge in ridges]


class KernelMethod(Method):
    uses_kernel = True
    default_ridge = DEFAULT_RIDGE

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        assert inputs.kernel is not None
        if inputs.features.target_inner is not None:
            return inputs.kernel.solve_inner(inputs.features.target_inner)
        assert inputs.features.target is not None
        return inputs.kernel.cross(inputs.features.target)

    def gram_kernel(self, inputs: ScoreInputs, ridge: Any) -> Kernel:
        """The kernel of a Gram-form input (ΦΦᵀ and k) under λ rule ``ridge``."""
        require_inputs(inputs, self.name, "train_gram", "feature_dim")
        rank = min(inputs.features.train_gram.shape[0], int(inputs.features.dim))
        rule = self.lambda_rule(ridge)
        lam = (
            rule.resolve(inputs.features.train_gram, rank)
            if isinstance(rule, Ridge)
            else float(rule)
        )
        return Kernel.from_gram(inputs.features.train_gram, lam)

    def score_grid(self, inputs: ScoreInputs, ridges: list[Any]) -> list[np.ndarray]:
        """Scores per λ rule from the Gram form (``train_gram``, ``target_inner``)."""
        return [
            self.score(replace(inputs, kernel=self.gram_kernel(inputs, ridge))) for ridge in ridges
        ]


class DAS(KernelMethod):
    """DAS: φ(x)ᵀ(ΦᵀΦ + λI)⁻¹φᵢ·wᵢ on gradients of the model output (Lin et al., 2025), wᵢ
    the training residual (``residual``), optionally leverage-corrected or squared."""

    name = "das"
    additive = True
    measure = "das"
    declared_options = (
        Option(
            "residual",
            "error",
            str,
            False,
            ("error", "signed", "raw", "none"),
            "wᵢ: the training image's error relative to the mean (error), its signed "
            "residual relative to the RMS (signed) or as it is (raw), or 1 (none)",
        ),
        Option(
            "leverage",
            False,
            bool,
            False,
            help="divide by 1 − hᵢ, the training image's leverage in the kernel",
        ),
        Option("squared", False, bool, False, help="square the scores (rank by magnitude)"),
    )

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        k = super().score(inputs)
        residual = self.options.get("residual", "error")
        if residual == "error":
            e = np.asarray(inputs.features.train_error, dtype=np.float64)
            w = e / max(float(e.mean()), 1e-30)
        elif residual == "signed":
            r = np.asarray(inputs.features.train_residual, dtype=np.float64)
            w = r / max(float(np.sqrt(np.mean(r**2))), 1e-30)
        elif residual == "raw":
            w = np.asarray(inputs.features.train_residual, dtype=np.float64)
        elif residual == "none":
            w = np.ones(k.shape[1])
        else:
            raise ConfigError(
                f"unknown DAS residual {residual!r}", hint="use error, signed, raw or none"
            )
        scores = k * w[None, :]
        if self.options.get("leverage", False):
            assert inputs.kernel is not None
            h = np.clip(inputs.kernel.leverage(), 0.0, 1.0 - 1e-6)
            scores = scores / (1.0 - h)[None, :]
        if self.options.get("squared", False):
            scores = scores**2
        return scores


class DTRAK(KernelMethod):
    """D-TRAK: the kernel score on gradients of ‖ε_θ(x_t, t)‖² (Zheng et al., 2024)."""

    name = "dtrak"
    additive = True
    measure = "dtrak"


class TRAK(KernelMethod):
    """TRAK: the kernel score on gradients of the diffusion loss (Park et al., 2023)."""

    name = "trak"
    additive = True
    measure = "loss"


def _cosine(targets: np.ndarray, features: np.ndarray) -> np.ndarray:
    """(T, N) cosines φ(x)ᵀφᵢ / (‖φ(x)‖‖φᵢ‖), streamed over tiles of the training features."""
    t = np.asarray(targets, dtype=np.float64)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-30)
    return inner_products(t, features) / np.maximum(row_norms(features), 1e-30)[None, :]


class GradDot(Method):
    """Dot products of loss gradients φ(x)ᵀφᵢ (no kernel)."""

    name = "grad-dot"
    additive = True
    measure = "loss"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        if inputs.features.target_inner is not None:
            return np.asarray(inputs.features.target_inner, dtype=np.float64)
        return inner_products(inputs.features.target, inputs.features.train)


class GradCos(Method):
    """Cosines of loss gradients (no kernel)."""

    name = "grad-cos"
    measure = "loss"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        if inputs.features.target_inner is not None:
            norms = np.sqrt(np.outer(inputs.features.target_sqnorm, inputs.features.train_sqnorm))
            return np.asarray(inputs.features.target_inner, dtype=np.float64) / np.maximum(
                norms, 1e-30
            )
        return _cosine(inputs.features.target, inputs.features.train)


class PixelDot(Method):
    """Dot products of the images' pixels."""

    name = "pixel-dot"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        a = inputs.target_images.reshape(inputs.num_targets, -1).double()
        b = inputs.train_images.reshape(inputs.num_train, -1).double()
        return (a @ b.T).numpy()


class PixelCos(Method):
    """Cosines of the images' pixels: the nearest-in-pixel-space baseline."""

    name = "pixel-cos"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        return _cosine(
            inputs.target_images.reshape(inputs.num_targets, -1).numpy(),
            inputs.train_images.reshape(inputs.num_train, -1).numpy(),
        )


class RandomScores(Method):
    """Seeded standard-normal scores: the chance baseline."""

    name = "random"
    declared_options = (Option("seed", 0, int, False, help="seed of the random scores"),)
    context_defaults = {"seed": "noise_seed"}

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        rng = np.random.default_rng(derive_seed(int(self.options.get("seed", 0)), 31337))
        return rng.standard_normal((inputs.num_targets, inputs.num_train))


METHODS: dict[str, type[Method]] = {
    m.name: m for m in (DAS, DTRAK, TRAK, GradDot, GradCos, PixelDot, PixelCos, RandomScores)
}


def get_method(name: str, **options: Any) -> Method:
    """Instantiate a registered method by name; an option it does not take is an error."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}", hint=f"choose from {sorted(METHODS)}")
    cls = METHODS[name]
    specs = {o.name: o for o in cls.option_specs()}
    unknown = sorted(set(options) - set(specs))
    if unknown:
        raise ConfigError(
            f"method {name!r} has no option {unknown[0]!r}",
            hint=f"its options: {', '.join(sorted(specs))}" if specs else "it takes no options",
        )
    for key, value in options.items():
        specs[key].check(name, value)
    return cls(options=options)


def method_context(settings: Any = None, run_dir: str | Path | None = None) -> dict[str, Any]:
    """What methods take option defaults from (``Method.context_defaults``): the noise seed of
    the feature ``settings`` and, where there is one, the run directory."""
    context: dict[str, Any] = {"noise_seed": getattr(settings, "noise_seed", 0)}
    if run_dir is not None:
        context["run_dir"] = str(run_dir)
    return context


def resolve_method(name: str, given: dict[str, Any], context: dict[str, Any]) -> Method:
    """Method ``name`` with the ``given`` options over the defaults it takes from
    ``context`` (:func:`method_context`): the one place a method's options are resolved, so
    every command gives a method the same defaults. An unknown option is refused as given."""
    get_method(name, **given)
    return get_method(name, **METHODS[name].options_from(context, given))


def _resolve(path: str) -> Any:
    """The object ``module:name``, imported when first needed."""
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class DelegatingMethod(Method):
    """A method computed by a function ``implementation`` (``module:name``, imported when
    used) called as ``fn(inputs, *fixed_args, **options) -> (scores, meta)``; its keyword
    parameters after those are the options the method takes."""

    needs_model = True
    implementation: ClassVar[str]
    fixed_args: ClassVar[tuple[Any, ...]] = ()
    #: Where its options are declared when the implementation takes ``**options``: the
    #: ``module:name`` of the function they are passed on to, its leading parameters that are
    #: not options, those of its parameters the caller fills, and defaults the caller decides.
    options_from_function: ClassVar[str | None] = None
    option_skip: ClassVar[int] = 0
    option_exclude: ClassVar[tuple[str, ...]] = ()
    option_overrides: ClassVar[dict[str, Any]] = {}

    @classmethod
    def function(cls) -> Any:
        return _resolve(cls.implementation)

    @classmethod
    def option_specs(cls) -> tuple[Option, ...]:
        if cls.options_from_function is None:
            return options_of_function(cls.function(), 1 + len(cls.fixed_args))
        specs = options_of_function(_resolve(cls.options_from_function), cls.option_skip)
        return tuple(
            replace(o, default=cls.option_overrides[o.name], optional=True)
            if o.name in cls.option_overrides
            else o
            for o in specs
            if o.name not in cls.option_exclude
        )

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        values, self.score_meta = self.function()(inputs, *self.fixed_args, **self.options)
        return values


# ---------------------------------------------------------------------------- baselines (#5)
# Appended: the remaining baselines of the DAS paper. The model-based ones (``needs_model``)
# read the optional context fields of ScoreInputs (model, schedule, settings, store_dir, ids,
# targets) and compute their own feature stores; the kernel-free image ones read images only.


class RelativeIF(KernelMethod):
    """φ(x)ᵀG⁻¹φᵢ / ‖G⁻¹φᵢ‖ (relative influence, Barshan et al. 2020) on loss gradients."""

    name = "relative-if"
    measure = "loss"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        from diffattr.attribution.methods.relative_if import inverse_norms

        k = super().score(inputs)
        assert inputs.kernel is not None
        gram = inputs.features.train_gram if inputs.kernel.form == "dual" else None
        norms = inverse_norms(inputs.kernel, gram)
        return k / np.maximum(norms, 1e-30)[None, :]


class RenormalizedIF(KernelMethod):
    """φ(x)ᵀG⁻¹φᵢ / ‖φᵢ‖ (renormalised influence) on loss gradients."""

    name = "renormalized-if"
    measure = "loss"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        from diffattr.attribution.kernel import row_norms

        k = super().score(inputs)
        if inputs.features.train_sqnorm is not None:
            norms = np.sqrt(np.asarray(inputs.features.train_sqnorm, dtype=np.float64))
        elif inputs.features.train_gram is not None:
            norms = np.sqrt(np.diag(np.asarray(inputs.features.train_gram, dtype=np.float64)))
        else:
            require_inputs(inputs, self.name, "train_features")
            norms = row_norms(inputs.features.train)
        return k / np.maximum(norms, 1e-30)[None, :]


class EmbeddingCos(Method):
    """Cosine of image embeddings: ``encoder=callable`` (N×C×H×W in [-1, 1] → N×D), else a
    small in-domain denoising autoencoder trained on the training set (seeded, cached in
    ``cache_dir`` or the caller's store directory; options ``dim``, ``steps``, ``seed``, …).
    """

    name = "embedding-cos"

    @classmethod
    def option_specs(cls) -> tuple[Option, ...]:
        from dataclasses import fields

        from diffattr.attribution.methods.embedding import EncoderSettings

        helps = documented_options(EncoderSettings.__doc__)
        settings = tuple(
            typed(f.name, f.default, f.type, helps.get(f.name, "")) for f in fields(EncoderSettings)
        )
        return (
            Option("encoder", help="a callable mapping images to embeddings (Python only)"),
            Option("cache_dir", None, str, help="where the trained encoder is kept"),
            *settings,
        )

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        from diffattr.attribution.methods.embedding import EncoderSettings, embedding_scores

        require_inputs(inputs, self.name, "train_images", "target_images")
        opts = dict(self.options)  # encoder, cache_dir, and EncoderSettings' fields
        encoder = opts.pop("encoder", None)
        cache_dir = opts.pop("cache_dir", None) or inputs.context.store_dir
        values, meta = embedding_scores(
            inputs.train_images,
            inputs.target_images,
            encoder=encoder,
            train_ids=inputs.train_ids,
            cache_dir=cache_dir,
            settings=EncoderSettings(**opts),
            progress=inputs.context.progress,
        )
        self.score_meta = meta
        return values


class TracIn(DelegatingMethod):
    """TracInCP: Σ_c η_c φ_c(x)ᵀφ_c(zᵢ) over saved checkpoints c (loss gradients).

    Options: ``checkpoints`` (a run directory — its ``checkpoints/step-N/ema`` —, or a list of
    models / model directories; required), ``learning_rates`` (η_c, default 1), ``measure``
    (default ``loss``). Features per checkpoint are stored in the caller's store directory,
    keyed by the checkpoint's fingerprint, with the caller's feature settings.
    """

    name = "tracin"
    additive = True
    needs = frozenset({CHECKPOINTS})
    context_defaults = {"checkpoints": "run_dir"}
    implementation = "diffattr.attribution.methods.tracin:tracin_from_inputs"
    fixed_args = ("dot", "tracin")


class GAS(TracIn):
    """GAS: Σ_c η_c cos(φ_c(x), φ_c(zᵢ)) over saved checkpoints (options as ``tracin``)."""

    name = "gas"
    additive = False
    fixed_args = ("cos", "gas")


class JourneyTRAK(KernelMethod):
    """TRAK with target features along the target's own sampling trajectory.

    τ(x, zᵢ) = φ_J(x)ᵀ G⁻¹ φᵢ, with G and φᵢ TRAK's (loss gradients of the training set) and

        φ_J(x) = Pᵀ (1/|S|) Σ_{s∈S} g_s / ‖g_s‖,
        g_s = ∇_θ ‖ε_θ(√ᾱ_{t_s} x̂₀⁽ˢ⁾ + √(1−ᾱ_{t_s}) ε_s, t_s) − ε_s‖² / d,

    x̂₀⁽ˢ⁾ the sampler's prediction of the clean image at step s of x's recorded trajectory and
    ε_s fresh noise keyed by (x's generation seed, t_s) — Journey-TRAK's definition; details
    in :mod:`.journey`. Options: ``steps`` (how many trajectory steps, evenly spaced; default
    all), ``generation_batch_size`` (default: the batch size recorded with the samples).
    Generated targets only (recorded seeds; the trajectory is regenerated from the whole
    Samples and checked bit for bit).
    """

    name = "journey-trak"
    additive = True
    measure = "loss"
    needs_model = True
    needs = frozenset({TRAJECTORIES})
    # sampler / num_steps: how ``lds eval`` describes the generated targets' sampling
    declared_options = (
        Option("steps", None, int, help="trajectory steps used, evenly spaced (unset: all)"),
        Option(
            "generation_batch_size",
            None,
            int,
            help="batch size the targets were generated in (unset: the samples' record)",
        ),
        Option(
            "sampler",
            None,
            str,
            True,
            ("ddim", "ddpm"),
            "sampler of generated targets given as images (unset: ddim)",
        ),
        Option(
            "num_steps",
            None,
            int,
            help="sampling steps of generated targets given as images (unset: 50)",
        ),
    )

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        from diffattr.attribution.methods.journey import journey_from_inputs

        features, meta = journey_from_inputs(
            inputs,
            steps=self.options.get("steps"),
            generation_batch_size=self.options.get("generation_batch_size"),
        )
        kernel = inputs.kernel
        if kernel is None:
            require_inputs(inputs, self.name, "train_features")
            kernel = Kernel.fit(inputs.features.train, self.lambda_rule(inputs.lam))
        self.score_meta = {**meta, "lambda": kernel.lam, "kernel_form": kernel.form}
        return kernel.cross(features)

    def score_grid(self, inputs: ScoreInputs, ridges: list[Any]) -> list[np.ndarray]:
        """On LDS targets (Gram form of TRAK's kernel): trajectory features for generated
        targets (``target_seeds`` ≥ 0), TRAK's own for real ones (no trajectory)."""
        from diffattr.attribution.methods.journey import journey_inner_products

        inner = journey_inner_products(inputs, self.options)
        inputs = inputs.updated(target_inner=inner)
        return [self.gram_kernel(inputs, r).solve_inner(inner) for r in ridges]


class Ensemble(DelegatingMethod):
    """Mean over models of a method's scores (TRAK-style ensembling).

    Options: ``base`` (the method averaged, default ``trak``), ``models`` (models or model
    directories, e.g. independently trained runs' ``model/`` or checkpoints), ``include_self``
    (default True: the attributed model is one member), ``base_options`` (dict for ``base``).
    """

    name = "ensemble"
    needs = frozenset({MODEL_CALLS})
    implementation = "diffattr.attribution.methods.ensemble:ensemble_from_inputs"

    def takes_lambda(self) -> bool:
        return get_method(self.options.get("base", "trak")).takes_lambda()


class EKFAC(DelegatingMethod):
    """Influence φ_q(x)ᵀ(F + λI)⁻¹∇L(zᵢ) with K-FAC/EK-FAC curvature (``kronfluence``).

    Training objective the diffusion loss; the query ``query`` = ``loss`` (default; positive =
    helps, as TRAK), ``das`` (mean of ε_θ) or ``dtrak`` (‖ε_θ‖²). Options: ``strategy``
    (ekfac, kfac, diagonal, identity), ``damping`` (None: kronfluence's heuristic), ``fisher``
    (true: sampled, seeded — the GGN; or empirical), ``pairing`` (samples: timestep-averaged
    gradients, default; items: kronfluence's own pairwise scoring of every (sample, timestep)
    pair, K² times the products, same scores). Needs ``pip install kronfluence``.
    """

    name = "ekfac"
    additive = True
    needs = frozenset({MODEL_INPUTS})
    implementation = "diffattr.attribution.methods.influence:ekfac_from_inputs"


class Combine(DelegatingMethod):
    """The mean of several methods' per-target standardised scores (``combination``).

    Option ``methods``: two or more members joined by ``+``, each with its own options in
    brackets, e.g. ``combine[methods=das+trak]`` or ``combine[methods=das+ekfac[normalize=true]]``.
    Each member uses its own features and default λ (or the λ given to the command).
    """

    name = "combine"
    implementation = "diffattr.attribution.methods.combination:combination_from_inputs"

    def components(self) -> list[tuple[str, dict[str, Any]]]:
        from diffattr.attribution.methods.combination import parse_members

        members = parse_members(self.options.get("methods"))
        for name, options in members:
            if name == self.name:
                raise ConfigError("combine cannot have combine as a member")
            get_method(name, **options)  # unknown methods and options fail before any work
        return members

    def requirements(self) -> frozenset[str]:
        return frozenset().union(*(get_method(n, **o).requirements() for n, o in self.components()))

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        self.components()  # every member checked before any is scored
        return super().score(inputs)


_BASELINES: tuple[type[Method], ...] = (
    RelativeIF,
    RenormalizedIF,
    EmbeddingCos,
    TracIn,
    GAS,
    JourneyTRAK,
    Ensemble,
    EKFAC,
    Combine,
)
METHODS.update({m.name: m for m in _BASELINES})


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return f"<{type(value).__name__}>"


def method_meta(method: Method) -> dict[str, Any]:
    """JSON-safe description of a scored method: its options (callables and models named by
    type) and what its last ``score`` reported (``score_meta``, e.g. the embedding used)."""
    return {"options": _json_safe(method.options), **getattr(method, "score_meta", {})}


# ---------------------------------------------------------------------------- unlearning (#29)
# Appended: attribution by unlearning the target (details and formulas in :mod:`.unlearning`).

#: The model's own training loss ‖f_θ(x_t, t) − y‖²/d under its NoiseSchedule (y = ε, v or
#: x₀), differentiated and fine-tuned by the method itself with the model called on (x_t, t)
#: alone: what unlearning methods need (a family whose model takes conditioning does not).
TRAINING_LOSS = "training-loss"


class UnlearningMethod(DelegatingMethod):
    """What the unlearning methods share: they fine-tune a copy of the model per target with
    its own training loss (the family must provide it), their seed follows the noise seed,
    their options are those of the ``*_scores`` function but the caller's batch size, device
    and progress, and ``timesteps`` / ``params`` default to the caller's K and ``--params``."""

    heldout_reference = False  # 64 more unlearnings per call
    needs = frozenset({TRAINING_LOSS})
    context_defaults = {"seed": "noise_seed"}
    option_exclude = ("batch_size", "device", "progress")
    option_overrides = {"timesteps": None, "params": None}


class AbU(UnlearningMethod):
    """AbU: raise the target's loss by Fisher-preconditioned ascent on a copy of the model;
    τ(x, zᵢ) = mean_k [ℓ_after(zᵢ, t_k) − ℓ_before(zᵢ, t_k)] on the same noise.

    Options: ``eta`` (step size η in θ ← θ + η g/(N(F+δ)), default 1e-3), ``steps`` (1),
    ``draws`` (target-loss draws per step, 256), ``damping`` (δ = damping·mean(F) per tensor,
    1e-3), ``fisher_draws`` (per training image, 4), ``timesteps`` (K of the loss pass; default
    the caller's K, else 20), ``params`` (regex of the parameters changed; default all),
    ``seed`` (default the noise seed)."""

    name = "abu"
    additive = True
    implementation = "diffattr.attribution.methods.unlearning:abu_from_inputs"
    options_from_function = "diffattr.attribution.methods.unlearning:abu_scores"
    option_skip = 5  # model, schedule, training images (ids), targets


class MUCS(UnlearningMethod):
    """MUCS: fine-tune a copy by descent on training batches and bounded ascent on the target;
    τ(x, zᵢ) = mean_k (L_u − L_t)/(L_u + L_t + 10⁻³) on a noise bank shared by all images.

    Options: ``lr`` (AdamW, default 2e-4), ``lam`` (λ, 0.2), ``max_steps`` (50), ``tol`` (stop
    at (1 − tol)·L_null, 0.05), ``retain_batch`` / ``forget_batch`` (32 / 32),
    ``weight_decay`` (0.01), ``l_null`` (default the zero predictor's loss), ``sigma_min``
    (0.3), ``rho`` (7), ``timesteps`` (bank size K; default the caller's K, else 20),
    ``params`` (default Linear/Conv weights outside the time embedding), ``seed``."""

    name = "mucs"
    implementation = "diffattr.attribution.methods.unlearning:mucs_from_inputs"
    options_from_function = "diffattr.attribution.methods.unlearning:mucs_scores"
    option_skip = 4  # model, schedule, training images, targets


METHODS.update({m.name: m for m in (AbU, MUCS)})
