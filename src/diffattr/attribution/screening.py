"""Candidate screening (the DAS paper's dataset compression): attribute each target to the M
training images most similar to it, not to all N.

For target x, the candidates C(x) are the M training images with the highest cheap similarity
s(x, zᵢ) (``pixel-cos``, ``embedding-cos``, or any registered image method). A kernel method
then scores x on C(x) alone,

    τ(x, zᵢ) = φ(x)ᵀ Φ_Cᵀ (Φ_C Φ_Cᵀ + λ I)⁻¹ eᵢ      (i ∈ C(x); kernel ``candidates``)

with its λ rule resolved on the M×M Gram of the candidates, as in the paper; or on the union
U = ∪ₓ C(x) of every target's candidates (kernel ``union``: one Gram, λ on U); or on all N
training images (kernel ``all``: the unscreened scores, kept on the candidates only — no
saving, the screen as a locality prior). Training images outside C(x) get no score (NaN).
With ``candidates`` or ``union`` only the union's rows need features, so featurizing costs
|U|·K gradients instead of N·K.

Both forms are computed from Gram blocks — the (|U|×|U|) Gram of the union's features and the
targets' inner products with them — so that the same code scores a run (:class:`Attributor`)
and a benchmark's cached kernels (``benchmarks/screening.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from diffattr.attribution.kernel import Kernel
from diffattr.attribution.kernel.ridge import Ridge
from diffattr.attribution.methods import Method, ScoreInputs, get_method
from diffattr.errors import ConfigError

#: Similarities a screen may use: image methods that need no features of the model.
SIMILARITIES = ("pixel-cos", "pixel-dot", "embedding-cos")
KERNEL_FORMS = ("union", "candidates", "all")
#: The kernel a screen fits by default: on both LDS benchmarks the union's beats the
#: per-target candidates' at every M (benchmarks/README.md, "Candidate screening").
DEFAULT_SCREEN_KERNEL = "union"


@dataclass(frozen=True)
class Screen:
    """Keep, per target, the ``size`` training images most similar by ``similarity``: a
    number of images, or below 1 a fraction of the training set (``pixel-cos:5%``)."""

    similarity: str
    size: int | float
    kernel: str = DEFAULT_SCREEN_KERNEL

    def count(self, num_train: int) -> int:
        """M for a training set of ``num_train`` images (a fraction rounded, at least 1)."""
        if self.size < 1:
            return max(1, int(round(self.size * num_train)))
        return min(int(self.size), num_train)

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise ConfigError(
                f"--screen: unknown similarity {self.similarity!r}",
                hint=f"choose from {', '.join(SIMILARITIES)}",
            )
        size = self.size
        whole = isinstance(size, int) or float(size).is_integer()
        if isinstance(size, bool) or not size > 0 or (size >= 1 and not whole):
            raise ConfigError(
                f"--screen: M must be a whole number ≥ 1 or a fraction of the training set "
                f"below 1 (e.g. 5%), got {size}"
            )
        if self.kernel not in KERNEL_FORMS:
            raise ConfigError(
                f"--screen-kernel: unknown kernel {self.kernel!r}",
                hint=f"choose from {', '.join(KERNEL_FORMS)}",
            )

    @classmethod
    def parse(cls, text: str, kernel: str = DEFAULT_SCREEN_KERNEL) -> Screen:
        """``SIMILARITY:M``: M images (``pixel-cos:100``) or a share of the training set
        (``pixel-cos:5%`` or ``pixel-cos:0.05``)."""
        name, sep, size = str(text).rpartition(":")
        m: int | float = 0
        try:
            if size.endswith("%"):
                m = float(size[:-1]) / 100
            else:
                m = float(size) if "." in size or "e" in size.lower() else int(size)
        except ValueError:
            m = 0
        if isinstance(m, float) and m >= 1 and m.is_integer():
            m = int(m)
        if not sep or not name or not m > 0:
            raise ConfigError(
                f"--screen {text!r} is not SIMILARITY:M",
                hint="e.g. --screen pixel-cos:100 or --screen pixel-cos:5%",
            )
        return cls(name, m, kernel)

    def __str__(self) -> str:
        size = f"{self.size * 100:g}%" if self.size < 1 else str(int(self.size))
        return f"{self.similarity}:{size}"

    def describe(self) -> dict[str, Any]:
        return {"similarity": self.similarity, "size": self.size, "kernel": self.kernel}


def check_screenable(method: Method) -> None:
    """A screen restricts a method's training features or images; a method that computes its
    own features from models (``needs_model``) cannot be restricted that way."""
    if method.needs_model:
        raise ConfigError(
            f"--screen cannot restrict {method.name!r}: it computes its own features from the "
            "model",
            hint="screen a kernel, gradient or image method (das, dtrak, trak, grad-cos, …)",
        )


def candidate_rows(similarity: np.ndarray, size: int) -> np.ndarray:
    """(T, M) training rows (positions in the training set, not ids) with the M highest
    similarities per target (ties: lower row first), each row's list sorted ascending."""
    s = np.asarray(similarity, dtype=np.float64)
    m = min(int(size), s.shape[1])
    order = np.argsort(-s, axis=1, kind="stable")[:, :m]
    return np.sort(order, axis=1)


def similarity_scores(screen: Screen, inputs: ScoreInputs) -> np.ndarray:
    """(T, N) the screen's similarity of every target to every training image."""
    sim = get_method(screen.similarity)
    images = ScoreInputs(
        train_images=inputs.train_images, target_images=inputs.target_images,
        num_train=inputs.num_train, num_targets=inputs.num_targets, train_ids=inputs.train_ids,
        target_ids=inputs.target_ids, context=inputs.context,
    )  # fmt: skip
    return sim.score(images)


def restrict(inputs: ScoreInputs, rows: np.ndarray, targets: np.ndarray) -> ScoreInputs:
    """The problem of scoring ``targets`` against training ``rows`` only (positions into the
    arrays of ``inputs``); the kernel is left to the caller."""

    def take(a: Any, idx: np.ndarray) -> Any:
        return None if a is None else a[idx]

    gram = inputs.features.train_gram
    inner = inputs.features.target_inner
    features = inputs.updated(
        train_features=take(inputs.features.train, rows),
        target_features=take(inputs.features.target, targets),
        target_inner=None if inner is None else np.asarray(inner)[np.ix_(targets, rows)],
        train_sqnorm=take(inputs.features.train_sqnorm, rows),
        target_sqnorm=take(inputs.features.target_sqnorm, targets),
        train_error=take(inputs.features.train_error, rows),
        train_residual=take(inputs.features.train_residual, rows),
        train_gram=None if gram is None else np.asarray(gram)[np.ix_(rows, rows)],
    ).features
    return replace(
        inputs,
        features=features,
        kernel=None,
        train_images=take(inputs.train_images, rows),
        target_images=take(inputs.target_images, targets),
        train_conditioning=take(inputs.train_conditioning, rows),
        target_conditioning=take(inputs.target_conditioning, targets),
        num_train=len(rows),
        num_targets=len(targets),
        train_ids=take(inputs.train_ids, rows),
        target_ids=take(inputs.target_ids, targets),
    )


def fit_gram_kernel(method: Method, gram: np.ndarray, lam: float | Ridge | None, rank: int):
    """The method's kernel on a Gram block, λ by its rule (``lam`` None: the method's own)."""
    rule = method.lambda_rule(lam)
    value = rule.resolve(gram, rank) if isinstance(rule, Ridge) else float(rule)
    return Kernel.from_gram(gram, value)


def screened_scores(
    method: Method,
    inputs: ScoreInputs,
    candidates: np.ndarray,
    kernel: str = DEFAULT_SCREEN_KERNEL,
    lam: float | Ridge | None = None,
    dim: int | None = None,
) -> tuple[np.ndarray, list[float]]:
    """(T, N) scores, NaN outside each target's ``candidates`` (T, M rows of ``inputs``), and
    the λ of each kernel fitted.

    ``inputs`` holds the N rows the candidates index (all training images, or just the union of
    the candidates); for kernel and gradient methods in Gram form (``train_gram``,
    ``target_inner``, squared norms, error and residual columns). ``dim``: the features' width,
    which bounds the Gram's rank (default: N).
    """
    check_screenable(method)
    candidates = np.asarray(candidates, dtype=np.int64)
    T, N = inputs.num_targets, inputs.num_train
    if candidates.ndim != 2 or candidates.shape[0] != T:
        raise ConfigError(f"candidate lists of shape {candidates.shape} for {T} targets")
    if method.uses_kernel and inputs.features.train_gram is None:
        raise ConfigError("screened kernel scores need the Gram of the candidates' features")
    if kernel not in KERNEL_FORMS:
        raise ConfigError(f"unknown screen kernel {kernel!r}", hint=", ".join(KERNEL_FORMS))
    out = np.full((T, N), np.nan)
    lams: list[float] = []
    if kernel in ("all", "union") or not method.uses_kernel:
        # one kernel for every target: on all N, or on the union of the candidates
        rows = np.arange(N) if kernel == "all" else np.unique(candidates)
        sub = restrict(inputs, rows, np.arange(T))
        if method.uses_kernel:
            kern = fit_gram_kernel(method, sub.features.train_gram, lam, min(len(rows), dim or N))
            sub = replace(sub, kernel=kern)
            lams.append(sub.kernel.lam)
        values = method.score(sub)
        pos = np.searchsorted(rows, candidates)
        out[np.arange(T)[:, None], candidates] = np.take_along_axis(values, pos, axis=1)
        return out, lams
    for t in range(T):
        rows = candidates[t]
        sub = restrict(inputs, rows, np.array([t]))
        kern = fit_gram_kernel(method, sub.features.train_gram, lam, min(len(rows), dim or N))
        sub = replace(sub, kernel=kern)
        lams.append(sub.kernel.lam)
        out[t, rows] = method.score(sub)[0]
    return out, lams
