"""Attribution scores: a (targets × training samples) matrix with ids, top-k and files."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.errors import DiffattrError
from diffattr.fsio import (
    atomic_directory,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
)


@dataclass
class Scores:
    """τ(x, zᵢ) for targets x (rows) and training samples zᵢ (columns).

    Positive = the training sample helps the model produce the target.
    """

    values: np.ndarray
    train_ids: np.ndarray
    target_ids: np.ndarray
    method: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float32)
        self.train_ids = np.asarray(self.train_ids, dtype=np.int64)
        self.target_ids = np.asarray(self.target_ids, dtype=np.int64)
        expected = (self.target_ids.size, self.train_ids.size)
        if self.values.shape != expected:
            raise DiffattrError(
                f"scores of shape {self.values.shape} do not match {expected[0]} targets × "
                f"{expected[1]} training samples"
            )

    def top_k(self, k: int, opponents: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), each (T, k): the k highest scores (or lowest, for opponents).

        Unscored training images (NaN: outside a screened target's candidates) come last; a
        target with fewer than k scores has NaN scores at the end of its row.
        """
        k = min(k, self.values.shape[1])
        v = -self.values if opponents else self.values
        idx = np.argsort(-v, axis=1, kind="stable")[:, :k]  # NaN sorts last
        return self.train_ids[idx], np.take_along_axis(self.values, idx, axis=1)

    def confidence(self) -> np.ndarray:
        """(T,) per-target confidence κ = mean(z⁴) − 3, z the target's standardized scores.

        See :mod:`diffattr.attribution.confidence`; NaN for a row without spread.
        """
        from diffattr.attribution.confidence import confidence

        return confidence(self.values)

    def confidence_bins(self) -> list[str | None]:
        """Per target 'low' / 'medium' / 'high' from the method's committed calibration.

        All None when the method has no calibration, its κ did not predict per-target LDS on
        the held-out benchmark (``validated`` false), or the scores are screened (κ over a
        target's candidates is not the κ that was calibrated).
        """
        from diffattr.attribution.confidence import confidence_bins, method_calibration

        entry = method_calibration(self.method)
        if entry is None or not entry.get("validated") or self.meta.get("screen"):
            return [None] * self.target_ids.size
        return confidence_bins(self.confidence(), entry["cuts"])

    def set_near_copies(self, near: Any) -> None:
        """Record a :class:`~diffattr.attribution.confidence.NearCopies` of these targets
        (same order) in ``meta["near_copy"]``: saved in ``meta.json`` and ``topk.json``."""
        if len(near.flagged) != self.target_ids.size:
            raise DiffattrError(
                f"near-copy flags for {len(near.flagged)} targets, but the scores have "
                f"{self.target_ids.size} targets"
            )
        self.meta["near_copy"] = near.to_meta(self.train_ids)

    def near_copy_flags(self) -> np.ndarray | None:
        """(T,) bool near-copy flags recorded with :meth:`set_near_copies`, or None."""
        near = self.meta.get("near_copy")
        return None if not near else np.asarray(near["flagged"], dtype=bool)

    def confidence_meta(self) -> dict[str, Any]:
        """The ``meta.json`` entry ``confidence``: definition, per-target values and bins."""
        from diffattr.attribution.confidence import DEFINITION, method_calibration

        entry = method_calibration(self.method)
        values = self.confidence()
        return {
            "definition": DEFINITION,
            "values": [float(v) if np.isfinite(v) else None for v in values],
            "bins": self.confidence_bins(),
            "calibration": None if entry is None else entry.get("settings"),
        }

    def save(self, out_dir: str | Path, k: int = 10) -> Path:
        """Write ``scores.npy``, ``meta.json`` and top-k tables (``topk.csv``, ``topk.json``).

        ``meta.json`` gains ``confidence`` (definition, per-target κ and bin) and, when set,
        ``near_copy``; each ``topk.json`` row carries its target's ``confidence``,
        ``confidence_bin`` (and ``near_copy``). :meth:`load` keeps them in ``meta``.

        The directory is built under a temporary name and renamed into place, so a killed
        write leaves either the previous scores or the complete new ones, never a mixture.
        """
        target = Path(out_dir)
        with atomic_directory(target) as out:
            self._write(out, k)
        return target

    def _write(self, out: Path, k: int) -> None:
        atomic_write(out / "scores.npy", lambda f: np.save(f, self.values))
        atomic_write(out / "train_ids.npy", lambda f: np.save(f, self.train_ids))
        atomic_write(out / "target_ids.npy", lambda f: np.save(f, self.target_ids))
        pro_ids, pro = self.top_k(k)
        opp_ids, opp = self.top_k(k, opponents=True)
        conf = self.confidence_meta()
        near = self.near_copy_flags()
        rows = []
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["target_id", "kind", "rank", "train_id", "score"])
        for t, tid in enumerate(self.target_ids):
            for kind, ids, vals in (("proponent", pro_ids, pro), ("opponent", opp_ids, opp)):
                for r in range(ids.shape[1]):
                    if np.isfinite(vals[t, r]):
                        w.writerow([int(tid), kind, r + 1, int(ids[t, r]), f"{vals[t, r]:.6g}"])
            rows.append(
                {
                    "target_id": int(tid),
                    "proponents": [
                        {"train_id": int(i), "score": float(s)}
                        for i, s in zip(pro_ids[t], pro[t], strict=True)
                        if np.isfinite(s)
                    ],
                    "opponents": [
                        {"train_id": int(i), "score": float(s)}
                        for i, s in zip(opp_ids[t], opp[t], strict=True)
                        if np.isfinite(s)
                    ],
                    "confidence": conf["values"][t],
                    "confidence_bin": conf["bins"][t],
                    **({} if near is None else {"near_copy": bool(near[t])}),
                }
            )
        atomic_write_bytes(out / "topk.csv", buf.getvalue().encode())
        atomic_write_bytes(out / "topk.json", json.dumps(rows, indent=1).encode())
        meta = {"method": self.method, **self.meta, "confidence": conf}
        atomic_write_json(out / "meta.json", meta)

    @classmethod
    def load(cls, out_dir: str | Path) -> Scores:
        out = Path(out_dir)
        if not (out / "scores.npy").is_file() or not (out / "meta.json").is_file():
            raise DiffattrError(f"no scores in {out}", hint="run `diffattr score` first")
        meta = read_json(out / "meta.json")
        method = meta.pop("method", "unknown")
        return cls(
            np.load(out / "scores.npy"),
            np.load(out / "train_ids.npy"),
            np.load(out / "target_ids.npy"),
            method,
            meta,
        )
