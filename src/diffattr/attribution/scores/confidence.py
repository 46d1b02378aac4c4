"""How sure can we be, per target: a confidence checked against LDS, and a near-copy flag.

**Confidence** κ(x) = mean(z⁴) − 3 with z = (τ(x, ·) − mean) / std over the training images:
the excess kurtosis of one target's attribution scores. A few training images standing far
out of the bulk (heavy tails) go with a higher LDS for that target. It was chosen among
score-concentration and agreement candidates on the digits8 LDS benchmark and reported on
mnist8 (``benchmarks/confidence.py``, ``benchmarks/README.md``, "Per-target confidence").

**Calibration**: low / medium / high bins, cut at the terciles of κ on the selection benchmark;
each bin carries the mean per-target LDS measured on both benchmarks (with a bootstrap CI), in
``confidence_calibration.json`` next to this file, which ``benchmarks/confidence.py`` writes.

**Relative to held-out images**: κ alone has no scale a user can read on their own data, so
each target's κ is also reported as a percentile among the κ of the run's own held-out real
images scored the same way (at most :data:`HELDOUT_REFERENCE` of them, the first of the
held-out split): "more concentrated than 80% of held-out images". It needs no ground truth.

**Like the calibration data**: the bins are shown only for scores of data like a benchmark's:
the same image size and channels and a training set within a factor 2 of its number of images
(the ``data`` entry of the calibration file: 8×8 grayscale digits, N = 500 and 1,000);
otherwise the bin is None, "not calibrated for this data".

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
#: At most this many held-out images (the first of the held-out split) are scored for the κ
#: reference: a cost of that many more targets per method.
HELDOUT_REFERENCE = 64
#: What the bins are when the scores' data are not like any calibration benchmark's.
NOT_LIKE = "not calibrated for this data"
#: How far a training set's size may be from a benchmark's and still count as like it.
LIKE_FACTOR = 2.0


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


def heldout_percentile(kappa: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per target, the share (in %) of held-out images' κ below its κ, ties counted half:
    100 · (#{r < κ} + ½ #{r = κ}) / n over the n finite reference values.

    NaN where κ is NaN or no reference value is finite.
    """
    k = np.asarray(kappa, dtype=np.float64).reshape(-1)
    r = np.asarray(reference, dtype=np.float64).reshape(-1)
    r = np.sort(r[np.isfinite(r)])
    out = np.full(k.shape, np.nan)
    if r.size == 0:
        return out
    ok = np.isfinite(k)
    below = np.searchsorted(r, k[ok], side="left")
    upto = np.searchsorted(r, k[ok], side="right")
    out[ok] = 100.0 * (below + 0.5 * (upto - below)) / r.size
    return out


def calibration_data(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Benchmark → the data it calibrated on: ``channels``, ``size`` [H, W], ``num_train``."""
    return load_calibration(path).get("data", {})


def describe_data(shape: tuple[int, ...] | list[int], num_train: int) -> str:
    """``C×H×W, N = n``: the data a set of scores was computed on."""
    return f"{'×'.join(str(int(d)) for d in shape)}, N = {int(num_train)}"


def like_calibration(
    shape: tuple[int, ...] | list[int] | None, num_train: int | None, path: str | Path | None = None
) -> str | None:
    """The first calibration benchmark whose data the scores' data are like, or None.

    Like: same channels and H×W as the benchmark, and N within a factor
    :data:`LIKE_FACTOR` of its N (max(N, N_b) ≤ 2 · min(N, N_b)).
    """
    if shape is None or num_train is None or len(shape) != 3 or num_train < 1:
        return None
    c, h, w = (int(d) for d in shape)
    for bench, d in calibration_data(path).items():
        n_b = int(d["num_train"])
        same = c == int(d["channels"]) and [h, w] == [int(x) for x in d["size"]]
        if same and max(num_train, n_b) <= LIKE_FACTOR * min(num_train, n_b):
            return bench
    return None


def calibration_words(path: str | Path | None = None) -> str:
    """Which benchmarks the bins come from, in words (for reports and meta.json)."""
    parts = [
        f"{b} ({d.get('description', '')}: {d['channels']}×{d['size'][0]}×{d['size'][1]}, "
        f"N = {d['num_train']})"
        for b, d in calibration_data(path).items()
    ]
    return "; ".join(parts) if parts else "no benchmark recorded"


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

    ``nearest`` (and ``embedding_nearest``) are training **ids**, as ``meta.json`` gives them:
    the dataset's ids when :func:`near_copies` got a dataset or ``train_ids``, else positions
    0…N−1 in the training images given. ``flagged``: pixel distance ≤ ``pixel_threshold``
    (and, with an encoder, embedding distance ≤ ``embedding_threshold``), the thresholds being
    the ``quantile`` of held-out real images' own nearest-training-image distances.
    """

    quantile: float
    nearest: np.ndarray  # (T,) training ids, nearest by pixel L2
    pixel_distance: np.ndarray
    pixel_threshold: float
    flagged: np.ndarray
    embedding_nearest: np.ndarray | None = None  # training ids, nearest by embedding
    embedding_distance: np.ndarray | None = None
    embedding_threshold: float | None = None

    def to_meta(self) -> dict[str, Any]:
        """JSON-ready fields (``nearest_train_id``: training ids)."""
        out: dict[str, Any] = {
            "quantile": self.quantile,
            "rule": "nearest training image at most the quantile of held-out real images' "
            "nearest-training-image distances",
            "flagged": [bool(f) for f in self.flagged],
            "nearest_train_id": [int(i) for i in self.nearest],
            "pixel_distance": [float(d) for d in self.pixel_distance],
            "pixel_threshold": self.pixel_threshold,
        }
        if self.embedding_distance is not None:
            out["embedding_distance"] = [float(d) for d in self.embedding_distance]
            out["embedding_threshold"] = self.embedding_threshold
        return out


def _images_and_ids(train: Any, train_ids: Any) -> tuple[Any, np.ndarray]:
    """(training images, their ids): a dataset's own ids, else ``train_ids``, else 0…N−1."""
    images = getattr(train, "images", train)
    ids = getattr(train, "ids", None) if train_ids is None else train_ids
    n = int(np.shape(images)[0])
    if ids is None:
        return images, np.arange(n, dtype=np.int64)
    ids = np.asarray(ids.cpu().numpy() if hasattr(ids, "cpu") else ids, dtype=np.int64)
    if ids.shape != (n,):
        raise ValueError(f"{ids.size} training ids for {n} training images")
    return images, ids


def near_copies(
    target_images: Any,
    train_images: Any,
    heldout_images: Any,
    quantile: float = NEAR_COPY_QUANTILE,
    encoder: Callable[[Any], Any] | None = None,
    train_ids: Any = None,
) -> NearCopies:
    """Flag targets closer to a training image than held-out real images are.

    d(x) = min_i ‖x − zᵢ‖₂; flagged iff d(x) ≤ Q_q{d(h) : h held out} (and the same with
    embedding cosine distance 1 − cos(e(x), e(zᵢ)) when ``encoder`` is given). Images are
    N×C×H×W tensors or arrays, or datasets. Nearest training images are named by id: the
    training dataset's ids, else ``train_ids``, else (bare images) their positions 0…N−1.
    Deterministic.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
    train_images, ids = _images_and_ids(train_images, train_ids)
    target_images = getattr(target_images, "images", target_images)
    heldout_images = getattr(heldout_images, "images", heldout_images)
    tgt, pool, held = _flat(target_images), _flat(train_images), _flat(heldout_images)
    if len(held) == 0 or len(pool) == 0:
        raise ValueError("near_copies needs training and held-out images")
    nearest, dist = nearest_l2(tgt, pool)
    _, held_dist = nearest_l2(held, pool)
    threshold = float(np.quantile(held_dist, quantile))
    out = NearCopies(quantile, ids[nearest], dist, threshold, dist <= threshold)
    if encoder is not None:
        _add_embedding(out, encoder, (tgt, target_images), (pool, train_images), ids,
                       (held, heldout_images))  # fmt: skip
    return out


def _add_embedding(out: NearCopies, encoder: Callable, target, train, ids, heldout) -> None:
    """The embedding half of :func:`near_copies`: each pair is (flat rows, original images)."""
    import torch

    from diffattr.attribution.methods.embedding import embed

    def emb(pair: tuple[np.ndarray, Any]) -> np.ndarray:
        flat, like = pair
        shape = tuple(np.shape(like))
        return embed(encoder, torch.from_numpy(flat.reshape(shape).astype(np.float32)))

    e_train = emb(train)
    e_idx, e_dist = nearest_cosine(emb(target), e_train)
    _, e_held = nearest_cosine(emb(heldout), e_train)
    e_thr = float(np.quantile(e_held, out.quantile))
    out.embedding_nearest, out.embedding_distance = ids[e_idx], e_dist
    out.embedding_threshold = e_thr
    out.flagged = out.flagged & (e_dist <= e_thr)
