"""The regularised Gram kernel G = ΦᵀΦ + λI and the products φ(x)ᵀG⁻¹φᵢ, streamed from disk.

Two exact forms of the same quantity (push-through identity):

    primal:  φ(x)ᵀ (ΦᵀΦ + λI)⁻¹ Φᵀ      a k×k Cholesky solve   (used when N ≥ k)
    dual:    φ(x)ᵀ Φᵀ (ΦΦᵀ + λI)⁻¹      an N×N Cholesky solve  (used when N < k)

Leverages hᵢ = φᵢᵀG⁻¹φᵢ come from the same factorisation; in the dual form
hᵢ = [ΦΦᵀ(ΦΦᵀ+λI)⁻¹]ᵢᵢ = 1 − λ[(ΦΦᵀ+λI)⁻¹]ᵢᵢ. Gram matrices accumulate in float64.

λ is relative by default: λ = c · ‖Φ‖²_F / min(N, k), i.e. c times the mean non-zero eigenvalue
of ΦᵀΦ, which is unchanged by projection to any k and by the choice of form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from diffattr.errors import ConfigError, NumericalError

DEFAULT_RELATIVE_LAMBDA = 0.1


def _blocks(n: int, block: int):
    for s in range(0, n, block):
        yield slice(s, min(n, s + block))


def gram_scale(features: np.ndarray, block: int = 4096) -> float:
    """‖Φ‖²_F / min(N, k): the mean non-zero eigenvalue of ΦᵀΦ."""
    n, k = features.shape
    total = 0.0
    for sl in _blocks(n, block):
        f = np.asarray(features[sl], dtype=np.float64)
        total += float(np.einsum("ij,ij->", f, f))
    return total / min(n, k)


@dataclass
class Kernel:
    """A factorised kernel over training features Φ (kept as a reference, e.g. a memmap)."""

    features: np.ndarray
    lam: float
    form: str
    factor: np.ndarray
    block: int = 4096

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        lam: float | None = None,
        relative_lambda: float = DEFAULT_RELATIVE_LAMBDA,
        form: str = "auto",
        block: int = 4096,
    ) -> Kernel:
        """Factorise G (primal) or ΦΦᵀ + λI (dual); ``lam`` absolute, else relative."""
        n, k = features.shape
        if form == "auto":
            form = "dual" if n < k else "primal"
        if form not in ("primal", "dual"):
            raise ConfigError(f"unknown kernel form {form!r}", hint="use auto, primal or dual")
        if lam is None:
            if relative_lambda <= 0:
                raise ConfigError("the relative λ must be positive")
            lam = relative_lambda * gram_scale(features, block)
        if not lam > 0:
            raise ConfigError(f"λ must be positive, got {lam}")
        if form == "primal":
            gram = np.zeros((k, k), dtype=np.float64)
            for sl in _blocks(n, block):
                f = np.asarray(features[sl], dtype=np.float64)
                gram += f.T @ f
        else:
            gram = np.zeros((n, n), dtype=np.float64)
            for si in _blocks(n, block):
                fi = np.asarray(features[si], dtype=np.float64)
                for sj in _blocks(n, block):
                    if sj.start < si.start:
                        continue
                    fj = np.asarray(features[sj], dtype=np.float64)
                    gram[si, sj] = fi @ fj.T
                    gram[sj, si] = gram[si, sj].T
        gram[np.diag_indices_from(gram)] += lam
        try:
            factor = scipy.linalg.cho_factor(gram, lower=True, check_finite=True)[0]
        except (np.linalg.LinAlgError, ValueError) as exc:
            diag = float(np.mean(np.diag(gram)) - lam)
            suggested = max(10 * lam, 1e-3 * diag)
            scale = diag * gram.shape[0] / min(n, k)  # mean non-zero eigenvalue of ΦᵀΦ
            relative = f" or --relative-lambda {suggested / scale:.3g}" if scale > 0 else ""
            raise NumericalError(
                f"the kernel G = ΦᵀΦ + λI with λ={lam:.3g} is singular to working precision "
                f"(not positive definite: {exc})",
                hint=f"increase λ, e.g. --lambda {suggested:.3g}{relative}",
            ) from exc
        return cls(features, float(lam), form, factor, block)

    @classmethod
    def from_gram(cls, gram: np.ndarray, lam: float) -> Kernel:
        """Dual-form kernel from a precomputed ΦΦᵀ (N×N); use :meth:`solve_inner` with it."""
        k = np.array(gram, dtype=np.float64, copy=True)
        k[np.diag_indices_from(k)] += lam
        try:
            factor = scipy.linalg.cho_factor(k, lower=True)[0]
        except (np.linalg.LinAlgError, ValueError) as exc:
            raise NumericalError(
                f"the kernel with λ={lam:.3g} is not positive definite ({exc})",
                hint=f"increase λ, e.g. to {10 * lam:.3g}",
            ) from exc
        return cls(np.empty((k.shape[0], 0)), float(lam), "dual", factor)

    def solve_inner(self, inner: np.ndarray) -> np.ndarray:
        """Dual form from precomputed φ(x)ᵀΦᵀ (T×N): φ(x)ᵀΦᵀ(ΦΦᵀ + λI)⁻¹."""
        if self.form != "dual":
            raise ConfigError("solve_inner needs the dual form")
        return self._solve(np.asarray(inner, dtype=np.float64).T).T

    def _solve(self, rhs: np.ndarray) -> np.ndarray:
        return scipy.linalg.cho_solve((self.factor, True), rhs, check_finite=False)

    def cross(self, targets: np.ndarray) -> np.ndarray:
        """(T, N) matrix of φ(x)ᵀ G⁻¹ φᵢ for target features ``targets`` (T, k)."""
        n = self.features.shape[0]
        t = np.asarray(targets, dtype=np.float64)
        if self.form == "primal":
            y = self._solve(t.T)  # (k, T) = G⁻¹ φ(x)
            out = np.empty((t.shape[0], n), dtype=np.float64)
            for sl in _blocks(n, self.block):
                out[:, sl] = (np.asarray(self.features[sl], dtype=np.float64) @ y).T
            return out
        inner = np.empty((t.shape[0], n), dtype=np.float64)  # φ(x)ᵀΦᵀ
        for sl in _blocks(n, self.block):
            inner[:, sl] = t @ np.asarray(self.features[sl], dtype=np.float64).T
        return self._solve(inner.T).T

    def leverage(self) -> np.ndarray:
        """hᵢ = φᵢᵀ G⁻¹ φᵢ ∈ [0, 1) for every training row."""
        n = self.features.shape[0]
        if self.form == "dual":
            inv_l = scipy.linalg.solve_triangular(self.factor, np.eye(n), lower=True)
            diag_inv = np.einsum("ij,ij->j", inv_l, inv_l)
            return 1.0 - self.lam * diag_inv
        h = np.empty(n, dtype=np.float64)
        for sl in _blocks(n, self.block):
            f = np.asarray(self.features[sl], dtype=np.float64)
            h[sl] = np.einsum("ij,ji->i", f, self._solve(f.T))
        return h
