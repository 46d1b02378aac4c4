"""Kernel caches of an LDS benchmark: per feature setting, the run's features reduced to
ΦΦᵀ (N×N) and φ(x)ᵀΦᵀ (targets × N) with norms and residual columns — small, so ``lds eval``
over many λ and methods runs in seconds and the caches can be committed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.errors import DiffattrError
from diffattr.evaluation.ground_truth import GroundTruth
from diffattr.families.bound import BoundRun
from diffattr.fsio import atomic_write_npz


def fingerprint_array(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


@dataclass
class KernelCache:
    """Dual-form kernel pieces of one feature setting: ΦΦᵀ, φ(x)ᵀΦᵀ, norms and residuals.

    Small (N×N + T×N), so LDS over many λ and methods runs in seconds and can be committed.
    """

    gram: np.ndarray
    inner: np.ndarray
    target_sqnorm: np.ndarray
    error: np.ndarray
    residual: np.ndarray
    dim: int
    meta: dict[str, Any]

    def save(self, path: Path) -> None:
        """Write as float32 (half the size; ample for the Cholesky at the λ grid used)."""
        arrays = {
            k: np.asarray(getattr(self, k), dtype=np.float32)
            for k in ("gram", "inner", "target_sqnorm", "error")
        }
        arrays["residual"] = self.residual
        arrays["dim"] = np.array(self.dim)
        arrays["meta"] = np.array(json.dumps(self.meta, sort_keys=True))
        atomic_write_npz(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> KernelCache:
        z = np.load(path)
        return cls(
            z["gram"].astype(np.float64),
            z["inner"].astype(np.float64),
            z["target_sqnorm"].astype(np.float64),
            z["error"].astype(np.float64),
            z["residual"].astype(np.float64),
            int(z["dim"]),
            json.loads(str(z["meta"])),
        )

    def gram_fields(self) -> dict[str, Any]:
        """The Gram form as :class:`ScoreInputs` fields: ΦΦᵀ, φ(x)ᵀΦᵀ, squared norms, error
        and residual columns, k."""
        return {
            "train_gram": self.gram,
            "target_inner": self.inner,
            "train_sqnorm": np.diag(self.gram).copy(),
            "target_sqnorm": self.target_sqnorm,
            "train_error": self.error,
            "train_residual": self.residual,
            "feature_dim": self.dim,
        }

    def scale(self) -> float:
        """Mean non-zero eigenvalue of ΦᵀΦ: trace / min(N, k)."""
        return float(np.trace(self.gram)) / min(self.gram.shape[0], self.dim)


def build_kernel_cache(
    bound: BoundRun, gt: GroundTruth, settings, progress: bool = True, device: str = "cpu"
) -> KernelCache:
    """Featurize the run's training set and the benchmark targets; reduce to a kernel cache."""
    from diffattr.attribution.kernel import dual_gram, inner_products

    method = {"das": "das", "dtrak": "dtrak", "loss": "trak"}[settings.measure]
    kwargs = {"device": device, "progress": progress}
    store = bound.featurize(method, None, settings, **kwargs)
    targets = (gt.images, gt.keys, gt.conditioning)
    tstore = bound.featurize_targets(method, None, settings, targets, **kwargs)
    features, _ = bound.describe(method, None, settings, **kwargs)
    tphi = np.asarray(tstore.features, dtype=np.float64)
    return KernelCache(
        dual_gram(store.features, block=256),
        inner_products(tphi, store.features, block=256),
        (tphi**2).sum(axis=1),
        store.column("error").astype(np.float64),
        store.column("residual").astype(np.float64),
        store.dim,
        {
            "features": features,
            "model_fingerprint": store.settings["model_fingerprint"],
            "targets": fingerprint_array(gt.keys),
        },
    )


def kernel_cache(
    bound: BoundRun | None,
    bench: Path,
    gt: GroundTruth,
    settings,
    progress: bool = True,
    device: str = "cpu",
) -> KernelCache:
    """Load the benchmark's cached kernel for ``settings`` or build it from ``bound``'s run."""
    proj = {"identity": "exact", "auto": "auto"}.get(
        settings.projector, f"{settings.projector}-k{settings.proj_dim}"
    )
    name = f"{settings.measure}-K{settings.timesteps}-{proj}-{settings.key()}.npz"
    path = bench / "kernels" / name
    if path.is_file():
        return KernelCache.load(path)
    if bound is None:
        raise DiffattrError(
            f"no cached kernel {path.name} in {bench}",
            hint="pass --run RUN so the features can be computed",
        )
    cache = build_kernel_cache(bound, gt, settings, progress, device)
    cache.save(path)
    return KernelCache.load(path)  # the same (float32-rounded) numbers as a later reload


def cache_inputs(cache: KernelCache | None, train_images, target_images) -> Any:
    """:class:`ScoreInputs` of a benchmark's images and, if given, its kernel cache (Gram form:
    ΦΦᵀ, φ(x)ᵀΦᵀ, squared norms, error and residual columns, k)."""
    from diffattr.attribution.inputs import ScoreInputs

    return ScoreInputs.of(
        train_images=train_images,
        target_images=target_images,
        num_train=len(train_images),
        num_targets=len(target_images),
        **(cache.gram_fields() if cache is not None else {}),
    )
