"""Norms for relative and renormalised influence: ‖G⁻¹φᵢ‖ and ‖φᵢ‖ per training row.

Relative influence (Barshan et al., 2020) divides the influence φ(x)ᵀG⁻¹φᵢ by ‖G⁻¹φᵢ‖;
renormalised influence divides it by ‖φᵢ‖. With G = ΦᵀΦ + λI (k×k):

    primal:  ‖G⁻¹φᵢ‖ from a Cholesky solve per block of rows (O(N k²), streamed from disk).
    dual:    G⁻¹Φᵀ = Φᵀ(ΦΦᵀ + λI)⁻¹ (push-through), so with K = ΦΦᵀ + λI and A = ΦΦᵀ
             G⁻¹φᵢ = ΦᵀK⁻¹eᵢ  and  ‖G⁻¹φᵢ‖² = [K⁻¹ A K⁻¹]ᵢᵢ = (K⁻¹eᵢ)ᵀ A (K⁻¹eᵢ).
             Only the N×N gram A is needed: from the caller (``gram``, e.g. the LDS kernel cache),
             recomputed in blocks from the kernel's features, or — for a kernel made by
             :meth:`Kernel.from_gram` without features — rebuilt as LLᵀ − λI from its factor.
             Columns of K⁻¹ are solved in blocks, so memory stays O(N · block).

The direct form K⁻¹ − λK⁻² of the same diagonal cancels badly when λ dominates; the sandwich
[K⁻¹AK⁻¹]ᵢᵢ = Σ_s s·uᵢₛ²/(s+λ)² has only positive terms.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from diffattr.attribution.kernel import Kernel, _blocks, dual_gram, read_tiles
from diffattr.errors import ConfigError


def _dual_gram(kernel: Kernel) -> np.ndarray:
    """ΦΦᵀ (N×N, float64) of a dual kernel: from its features, else from its factor."""
    n, k = kernel.features.shape
    if k > 0:
        return dual_gram(kernel.features, kernel.block)
    low = np.tril(kernel.factor)  # cho_factor leaves other data in the upper triangle
    gram = low @ low.T
    gram[np.diag_indices_from(gram)] -= kernel.lam
    return gram


def inverse_norms(kernel: Kernel, gram: np.ndarray | None = None) -> np.ndarray:
    """‖G⁻¹φᵢ‖ for every training row, G = ΦᵀΦ + λI (either kernel form).

    ``gram``: ΦΦᵀ (N×N) when the caller has it (dual form only; saves recomputing it).
    """
    if kernel.form == "primal":
        if gram is not None:
            raise ConfigError("a precomputed gram only applies to the dual kernel form")
        n = kernel.features.shape[0]
        out = np.empty(n, dtype=np.float64)
        for sl, f in read_tiles(kernel.features, kernel.block):
            y = kernel._solve(f.T)  # (k, b) = G⁻¹φᵢ
            out[sl] = np.sqrt(np.einsum("ij,ij->j", y, y))
        return out
    n = kernel.factor.shape[0]
    if gram is None:
        gram = _dual_gram(kernel)
    gram = np.asarray(gram, dtype=np.float64)
    if gram.shape != (n, n):
        raise ConfigError(f"the gram has shape {gram.shape}, the kernel is {n}×{n}")
    sq = np.empty(n, dtype=np.float64)
    for sl in _blocks(n, kernel.block):
        rhs = np.zeros((n, sl.stop - sl.start), dtype=np.float64)
        rhs[np.arange(sl.start, sl.stop), np.arange(sl.stop - sl.start)] = 1.0
        m = scipy.linalg.cho_solve((kernel.factor, True), rhs, check_finite=False)  # K⁻¹eᵢ
        sq[sl] = np.einsum("ij,ij->j", m, gram @ m)
    return np.sqrt(np.clip(sq, 0.0, None))
