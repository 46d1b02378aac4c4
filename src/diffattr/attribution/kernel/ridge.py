"""How the ridge λ of the kernel G = ΦᵀΦ + λI is chosen (:class:`Ridge`).

Three rules, each computed from the training features alone (no LDS ground truth needed):

- ``absolute``      λ = value.
- ``relative``      λ = value · tr(ΦᵀΦ) / m, m = min(N, k): value times the mean non-zero
                    eigenvalue of ΦᵀΦ.
- ``effective-dim`` λ solves df(λ) = Σⱼ σⱼ / (σⱼ + λ) = D, σⱼ the eigenvalues of ΦᵀΦ
                    (equivalently of ΦΦᵀ): the ridge keeps D effective dimensions, D = value · m
                    for a value in (0, 1), else D = min(value, m / 2) for a whole number.
                    The default keeps 200 dimensions: on both committed LDS benchmarks (N = 500
                    and 1,000) it lands within 0.015 of the cross-fitted λ for every kernel
                    method and K, while the best *relative* λ moves over four decades between
                    methods and K, and a fixed fraction of m does not carry over from one N to
                    the other (benchmarks/README.md, "Choosing λ").

The spectrum is exact (``eigvalsh``) for m ≤ :data:`EXACT_SPECTRUM_MAX`; above that df is
estimated by stochastic Lanczos quadrature (seeded Rademacher probes run in lockstep, one
m×m by m×probes product per step), so a 32,768-wide Gram costs tens of matrix–block products
rather than an O(m³) eigendecomposition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.optimize import brentq

from diffattr.errors import ConfigError

RULES = ("effective-dim", "relative", "absolute")
#: Largest Gram whose spectrum is computed exactly; above it df is estimated (Lanczos).
EXACT_SPECTRUM_MAX = 2048
LANCZOS_PROBES = 16
LANCZOS_STEPS = 48


@dataclass(frozen=True)
class Ridge:
    """A rule for λ: ``Ridge("effective-dim", 200)``, ``Ridge("relative", 1e-3)``, …"""

    rule: str
    value: float

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(
                f"unknown λ rule {self.rule!r}", hint=f"use one of {', '.join(RULES)}"
            )
        value = float(self.value)
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"the {self.rule} λ must be a positive number, got {self.value!r}")
        if self.rule == "effective-dim" and value >= 1 and value != int(value):
            raise ConfigError(
                "the effective dimension is a fraction in (0, 1) of min(N, k) or a whole "
                f"number of dimensions, got {self.value!r}"
            )
        object.__setattr__(self, "value", value)

    def target_dimensions(self, rank: int) -> float:
        """The effective dimension df(λ) an ``effective-dim`` rule asks for at rank m: value·m
        for a fraction, else the count, at most m / 2."""
        return self.value * rank if self.value < 1 else min(self.value, rank / 2)

    def __str__(self) -> str:
        return f"{self.rule}:{self.value:g}"

    @classmethod
    def parse(cls, text: str) -> Ridge:
        """``effective-dim:200``, ``effective-dim:0.4``, ``relative:1e-3`` or ``absolute:0.5``."""
        rule, sep, value = str(text).partition(":")
        if not sep:
            raise ConfigError(
                f"λ rule {text!r} is not RULE:VALUE", hint="e.g. effective-dim:200 or relative:1e-3"
            )
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"λ rule {text!r}: {value!r} is not a number") from None
        return cls(rule.strip(), number)

    def resolve(self, gram: np.ndarray, rank: int | None = None, seed: int = 0) -> float:
        """Absolute λ for the Gram ``gram`` (ΦᵀΦ or ΦΦᵀ, before λ is added).

        ``rank``: m = min(N, k) (default: the Gram's size; smaller for a dual Gram of k < N
        projected features). Reads ``gram`` only.
        """
        m = int(rank or gram.shape[0])
        if self.rule == "absolute":
            return self.value
        scale = float(np.trace(gram)) / m
        if self.rule == "relative":
            return self.value * scale
        return effective_dim_lambda(gram, self.target_dimensions(m), scale, seed)


#: The rule a kernel method uses unless told otherwise (``Method.default_ridge``).
DEFAULT_RIDGE = Ridge("effective-dim", 200)


def spectrum_quadrature(
    gram: np.ndarray, seed: int = 0, probes: int = LANCZOS_PROBES, steps: int = LANCZOS_STEPS
) -> tuple[np.ndarray, np.ndarray]:
    """Nodes θ and weights w with Σ w·f(θ) ≈ tr f(G) for smooth f (G symmetric PSD).

    Exact for size ≤ EXACT_SPECTRUM_MAX (the eigenvalues, weight 1 each); else stochastic
    Lanczos quadrature: per Rademacher probe z (‖z‖² = m), zᵀf(G)z ≈ m Σⱼ τⱼ² f(θⱼ) with θⱼ, τⱼ
    the Ritz values and first eigenvector components of its Lanczos tridiagonal; averaged over
    probes.
    """
    m = gram.shape[0]
    if m <= EXACT_SPECTRUM_MAX:
        ev = scipy.linalg.eigvalsh(np.asarray(gram, dtype=np.float64), check_finite=False)
        return np.clip(ev, 0.0, None), np.ones(m)
    steps = min(steps, m)
    rng = np.random.default_rng(seed)
    dt = gram.dtype
    v = (rng.integers(0, 2, size=(m, probes)) * 2 - 1).astype(dt) / np.sqrt(m).astype(dt)
    basis = np.zeros((steps, m, probes), dtype=dt)
    alpha = np.zeros((steps, probes))
    beta = np.zeros((steps, probes))
    done = np.full(probes, steps)
    for j in range(steps):
        basis[j] = v
        w = gram @ v
        alpha[j] = np.einsum("ij,ij->j", v, w)
        # full re-orthogonalisation against this probe's basis (twice is enough)
        for _ in range(2):
            coef = np.einsum("sip,ip->sp", basis[: j + 1], w)
            w = w - np.einsum("sip,sp->ip", basis[: j + 1], coef)
        b = np.sqrt(np.einsum("ij,ij->j", w, w))
        beta[j] = b
        small = b <= 1e-10 * max(1.0, float(np.abs(alpha[: j + 1]).max()))
        done = np.where(small & (done == steps), j + 1, done)
        v = w / np.where(b > 0, b, 1.0)
    nodes, weights = [], []
    for p in range(probes):
        n = int(done[p])
        theta, vecs = scipy.linalg.eigh_tridiagonal(alpha[:n, p], beta[: n - 1, p])
        nodes.append(np.clip(theta, 0.0, None))
        weights.append(m * vecs[0] ** 2 / probes)
    return np.concatenate(nodes), np.concatenate(weights)


def effective_dimension(nodes: np.ndarray, weights: np.ndarray, lam: float) -> float:
    """df(λ) = tr G(G + λI)⁻¹ = Σ w θ / (θ + λ)."""
    return float(np.sum(weights * nodes / (nodes + lam)))


def effective_dim_lambda(gram: np.ndarray, target: float, scale: float, seed: int = 0) -> float:
    """λ with df(λ) = ``target`` (``scale``: the mean eigenvalue, to bracket the search).

    df falls monotonically from rank(G) at λ → 0 to 0; a target above what the spectrum can
    reach (rank-deficient features) gives the bracket's lower end, 1e-12 · scale.
    """
    if not scale > 0:
        raise ConfigError("the training features are all zero: no λ can be chosen")
    nodes, weights = spectrum_quadrature(gram, seed)
    lo, hi = math.log(1e-12 * scale), math.log(1e6 * scale)
    if effective_dimension(nodes, weights, math.exp(lo)) <= target:
        return math.exp(lo)
    root = brentq(lambda x: effective_dimension(nodes, weights, math.exp(x)) - target, lo, hi)
    return math.exp(root)
