"""How sure can we be, per target: a confidence checked against LDS, and a near-copy flag.

**Confidence** κ(x) = mean(z⁴) − 3 with z = (τ(x, ·) − mean) / std over the training images:
the excess kurtosis of one target's attribution scores. A few training images standing far
out of the bulk (heavy tails) go with a higher LDS for that target. It was chosen among
score-concentration and agreement candidates on the digits8 LDS benchmark and reported on
mnist8 (``benchmarks/confidence.py``, ``benchmarks/README.md``, "Per-target confidence").

**Calibration**: low / medium / high bins, cut at the terciles of κ on the selection benchmark;
each bin carries the mean per-target LDS measured on both benchmarks (with a bootstrap CI), in
``confidence_calibration.json`` next to this file, which ``benchmarks/confidence.py`` writes.

**Near copies**: a target whose nearest training image (pixel L2; and embedding distance when
an encoder is given) is at most the ``quantile`` of held-out real images' nearest-training-image
distances is flagged: it is closer to a training image than all but that fraction of real
images not trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

#: The one-line definition stored with saved scores and shown in the report.
DEFINITION = "excess kurtosis of the target's scores: mean(z^4) - 3, z = (score - mean) / std"
CALIBRATION_PATH = Path(__file__).with_name("confidence_calibration.json")
BINS = ("low", "medium", "high")
#: Default quantile of held-out real images' nearest-training-image distances.
NEAR_COPY_QUANTILE = 0.05


def confidence(scores: np.ndarray) -> np.ndarray:
    """κ per target (row): mean(z⁴) − 3, z = (τ − mean τ) / std τ over the row's finite scores.

    ``scores``: (T, N), or (N,) for one target (then a 0-d array). NaN where a row has fewer
    than 4 finite scores or zero spread. Float64, deterministic.
    """
    s = np.asarray(scores, dtype=np.float64)
    one = s.ndim == 1
    s = np.atleast_2d(s)
    finite = np.isfinite(s)
    n = finite.sum(axis=1)
    x = np.where(finite, s, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = x.sum(axis=1) / n
        d = np.where(finite, s - mean[:, None], 0.0)
        m2 = (d**2).sum(axis=1) / n
        m4 = (d**4).sum(axis=1) / n
        kappa = m4 / m2**2 - 3.0
    kappa[(n < 4) | ~(m2 > 0)] = np.nan
    return kappa[0] if one else kappa


@lru_cache(maxsize=4)
def _read_calibration(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def load_calibration(path: str | Path | None = None) -> dict[str, Any]:
    """The committed calibration (``confidence_calibration.json``); {} when absent."""
    p = Path(path) if path is not None else CALIBRATION_PATH
    return _read_calibration(str(p)) if p.is_file() else {}


def method_calibration(method: str, path: str | Path | None = None) -> dict[str, Any] | None:
    """The calibration entry of ``method`` (cut points, bin LDS), or None if not calibrated."""
    return load_calibration(path).get("methods", {}).get(method)


def confidence_bins(values: np.ndarray, cuts: list[float] | tuple[float, ...]) -> list[str | None]:
    """'low' if κ < cuts[0], 'medium' if κ < cuts[1], else 'high'; None for NaN."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    idx = np.searchsorted(np.asarray(cuts, dtype=np.float64), v, side="right")
    return [None if not np.isfinite(x) else BINS[int(i)] for x, i in zip(v, idx, strict=True)]


def bin_lds(entry: dict[str, Any], bin_name: str, kind: str) -> list[dict[str, Any]]:
    """Rows ``{"benchmark", "count", "mean", "ci"}`` of one bin and target kind, per benchmark."""
    out = []
    for bench, kinds in entry.get("lds", {}).items():
        for row in kinds.get(kind, []):
            if row.get("bin") == bin_name:
                out.append({"benchmark": bench, **{k: row[k] for k in ("count", "mean", "ci")}})
    return out


# ---------------------------------------------------------------------------- near copies


def _flat(images: Any) -> np.ndarray:
    a = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return a.reshape(a.shape[0], -1).astype(np.float64)


def nearest_l2(queries: np.ndarray, pool: np.ndarray, chunk: int = 64) -> tuple[np.ndarray, ...]:
    """(position, distance) of each query row's nearest pool row: min_j ‖q − p_j‖₂.

    Exact differences (no ‖q‖² + ‖p‖² − 2q·p cancellation: an exact copy gives 0); ties go
    to the lower position. Chunked over queries.
    """
    idx = np.empty(len(queries), dtype=np.int64)
    dist = np.empty(len(queries))
    rows = max(1, min(chunk, int(2**23 // max(1, pool.size))))
    for s in range(0, len(queries), rows):
        q = queries[s : s + rows]
        d = np.sqrt(((q[:, None, :] - pool[None, :, :]) ** 2).sum(axis=2))
        idx[s : s + rows] = np.argmin(d, axis=1)
        dist[s : s + rows] = d[np.arange(len(q)), idx[s : s + rows]]
    return idx, dist


def nearest_cosine(queries: np.ndarray, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position, distance) of the nearest pool row by cosine distance 1 − cos(q, p)."""
    qn = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-30)
    pn = pool / np.maximum(np.linalg.norm(pool, axis=1, keepdims=True), 1e-30)
    d = np.clip(1.0 - qn @ pn.T, 0.0, 2.0)
    idx = np.argmin(d, axis=1)
    return idx, d[np.arange(len(d)), idx]


@dataclass
class NearCopies:
    """Per target: the nearest training image, its distances, and whether it is a near copy.

    ``flagged``: pixel distance ≤ ``pixel_threshold`` (and, with an encoder, embedding
    distance ≤ ``embedding_threshold``), the thresholds being the ``quantile`` of held-out
    real images' own nearest-training-image distances.
    """

    quantile: float
    nearest: np.ndarray  # (T,) training positions, nearest by pixel L2
    pixel_distance: np.ndarray
    pixel_threshold: float
    flagged: np.ndarray
    embedding_nearest: np.ndarray | None = None
    embedding_distance: np.ndarray | None = None
    embedding_threshold: float | None = None

    def to_meta(self, train_ids: np.ndarray | None = None) -> dict[str, Any]:
        """JSON-ready fields (nearest as training ids when ``train_ids`` is given)."""
        ids = self.nearest if train_ids is None else np.asarray(train_ids)[self.nearest]
        out: dict[str, Any] = {
            "quantile": self.quantile,
            "rule": "nearest training image at most the quantile of held-out real images' "
            "nearest-training-image distances",
            "flagged": [bool(f) for f in self.flagged],
            "nearest_train_id": [int(i) for i in ids],
            "pixel_distance": [float(d) for d in self.pixel_distance],
            "pixel_threshold": self.pixel_threshold,
        }
        if self.embedding_distance is not None:
            out["embedding_distance"] = [float(d) for d in self.embedding_distance]
            out["embedding_threshold"] = self.embedding_threshold
        return out


def near_copies(
    target_images: Any,
    train_images: Any,
    heldout_images: Any,
    quantile: float = NEAR_COPY_QUANTILE,
    encoder: Callable[[Any], Any] | None = None,
) -> NearCopies:
    """Flag targets closer to a training image than held-out real images are.

    d(x) = min_i ‖x − zᵢ‖₂; flagged iff d(x) ≤ Q_q{d(h) : h held out} (and the same with
    embedding cosine distance 1 − cos(e(x), e(zᵢ)) when ``encoder`` is given). Images are
    N×C×H×W tensors or arrays; deterministic.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
    tgt, train, held = _flat(target_images), _flat(train_images), _flat(heldout_images)
    if len(held) == 0 or len(train) == 0:
        raise ValueError("near_copies needs training and held-out images")
    nearest, dist = nearest_l2(tgt, train)
    _, held_dist = nearest_l2(held, train)
    threshold = float(np.quantile(held_dist, quantile))
    flagged = dist <= threshold
    out = NearCopies(quantile, nearest, dist, threshold, flagged)
    if encoder is not None:
        import torch

        from diffattr.attribution.embedding import embed

        def emb(a: np.ndarray, like: Any) -> np.ndarray:
            shape = tuple(np.shape(like))
            return embed(encoder, torch.from_numpy(a.reshape(shape).astype(np.float32)))

        e_train = emb(train, train_images)
        e_idx, e_dist = nearest_cosine(emb(tgt, target_images), e_train)
        _, e_held = nearest_cosine(emb(held, heldout_images), e_train)
        e_thr = float(np.quantile(e_held, quantile))
        out.embedding_nearest, out.embedding_distance, out.embedding_threshold = (
            e_idx,
            e_dist,
            e_thr,
        )
        out.flagged = flagged & (e_dist <= e_thr)
    return out
