"""Attribution scores: a (targets × training samples) matrix with ids, top-k and files."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.attribution.scores.names import FIELDS, Names
from diffattr.errors import DiffattrError
from diffattr.fsio import (
    atomic_directory,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
)

#: Columns of ``topk.csv``: the first five as before names existed, then the names.
CSV_COLUMNS = ("target_id", "kind", "rank", "train_id", "score")
CSV_COLUMNS += ("train_source", "train_caption", "train_group", "target_source", "target_caption")


@dataclass
class Scores:
    """τ(x, zᵢ) for targets x (rows) and training samples zᵢ (columns).

    Positive = the training sample helps the model produce the target. ``train_ids`` and
    ``target_ids`` are the datasets' stable ids (:mod:`diffattr.attribution.scores.names`), never
    positions. ``train_names`` (source, caption, group per training id) name the top-k
    tables' rows and are not saved whole; ``target_names`` are saved in ``meta.json``.
    """

    values: np.ndarray
    train_ids: np.ndarray
    target_ids: np.ndarray
    method: str
    meta: dict[str, Any] = field(default_factory=dict)
    train_names: Names | None = field(default=None, repr=False, compare=False)
    target_names: Names | None = field(default=None, repr=False, compare=False)
    #: Training id → group name for :meth:`by_group` (None: the training names' groups).
    groups: dict[int, str] | None = field(default=None, repr=False, compare=False)

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

        Returns training **ids** (not positions). Unscored training images (NaN: outside a
        screened target's candidates) come last; a target with fewer than k scores has NaN
        scores at the end of its row.
        """
        k = min(k, self.values.shape[1])
        v = -self.values if opponents else self.values
        idx = np.argsort(-v, axis=1, kind="stable")[:, :k]  # NaN sorts last
        return self.train_ids[idx], np.take_along_axis(self.values, idx, axis=1)

    def confidence(self) -> np.ndarray:
        """(T,) per-target confidence κ = mean(z⁴) − 3, z the target's standardized scores.

        See :mod:`diffattr.attribution.scores.confidence`; NaN for a row without spread.
        """
        from diffattr.attribution.scores.confidence import confidence

        return confidence(self.values)

    def calibration(self) -> tuple[dict[str, Any] | None, str]:
        """(the method's calibration entry when its bins apply to these scores, else None;
        why, in words: ``calibrated on digits8``, ``not calibrated for this data``, …).

        Bins apply when the method is calibrated and validated, the scores are unscreened, and
        ``meta["train_data"]`` (set by the ``Attributor``) is like a calibration benchmark's
        data (:func:`~diffattr.attribution.scores.confidence.like_calibration`).
        """
        from diffattr.attribution.scores.confidence import (
            NOT_LIKE,
            like_calibration,
            method_calibration,
        )

        entry = method_calibration(self.method)
        if entry is None:
            return None, f"not calibrated for {self.method}"
        if not entry.get("validated"):
            return None, f"not validated for {self.method}"
        if self.meta.get("screen"):
            return None, "not calibrated for screened scores"
        data = self.meta.get("train_data") or {}
        bench = like_calibration(data.get("shape"), data.get("count"))
        return (entry, f"calibrated on {bench}") if bench else (None, NOT_LIKE)

    def confidence_bins(self) -> list[str | None]:
        """Per target 'low' / 'medium' / 'high' from the method's committed calibration.

        All None unless :meth:`calibration` applies: the method is calibrated and its κ
        predicted per-target LDS on the held-out benchmark, the scores are unscreened (κ over
        a target's candidates is not the κ that was calibrated), and the training data are
        like the calibration benchmarks' (same size and channels, N within a factor 2).
        """
        from diffattr.attribution.scores.confidence import confidence_bins

        entry, _ = self.calibration()
        if entry is None:
            return [None] * self.target_ids.size
        return confidence_bins(self.confidence(), entry["cuts"])

    def set_confidence_reference(self, kappa: np.ndarray, ids: np.ndarray) -> None:
        """Record κ of held-out real images (ids ``ids``) scored the same way, in
        ``meta["confidence_reference"]``: :meth:`confidence_percentiles` ranks among them."""
        values = np.asarray(kappa, dtype=np.float64).reshape(-1)
        self.meta["confidence_reference"] = {
            "kind": "held-out real images, scored the same way",
            "ids": [int(i) for i in np.asarray(ids).reshape(-1)],
            "values": [float(v) if np.isfinite(v) else None for v in values],
        }

    def confidence_percentiles(self) -> np.ndarray | None:
        """(T,) % of the held-out reference's κ below each target's (ties half), or None
        without a reference (:meth:`set_confidence_reference`)."""
        from diffattr.attribution.scores.confidence import heldout_percentile

        ref = self.meta.get("confidence_reference")
        if not ref:
            return None
        values = np.array([np.nan if v is None else v for v in ref["values"]], dtype=np.float64)
        return heldout_percentile(self.confidence(), values)

    def set_near_copies(self, near: Any) -> None:
        """Record a :class:`~diffattr.attribution.scores.confidence.NearCopies` of these targets
        (same order, nearest images named by training id) in ``meta["near_copy"]``: saved in
        ``meta.json`` and ``topk.json``."""
        if len(near.flagged) != self.target_ids.size:
            raise DiffattrError(
                f"near-copy flags for {len(near.flagged)} targets, but the scores have "
                f"{self.target_ids.size} targets"
            )
        if not np.isin(np.asarray(near.nearest), self.train_ids).all():
            raise DiffattrError(
                "the near-copy check names training images that these scores do not score",
                hint="pass the training set (its ids) or train_ids to near_copies",
            )
        self.meta["near_copy"] = near.to_meta()

    def near_copy_flags(self) -> np.ndarray | None:
        """(T,) bool near-copy flags recorded with :meth:`set_near_copies` (as
        ``Attributor.score(..., heldout=...)`` does), or None."""
        near = self.meta.get("near_copy")
        return None if not near else np.asarray(near["flagged"], dtype=bool)

    def confidence_meta(self) -> dict[str, Any]:
        """The ``meta.json`` entry ``confidence``: definition, per-target κ, held-out
        percentile and bin, what the bins mean here and which benchmarks they come from."""
        from diffattr.attribution.scores.confidence import DEFINITION, calibration_words

        entry, status = self.calibration()
        pct = self.confidence_percentiles()
        ref = self.meta.get("confidence_reference")
        return {
            "definition": DEFINITION,
            "values": _floats(self.confidence()),
            "heldout_percentile": None if pct is None else _floats(pct),
            "heldout_count": None if not ref else len(ref["values"]),
            "bins": self.confidence_bins(),
            "bin_status": status,
            "calibration": None if entry is None else entry.get("settings"),
            "calibrated_on": calibration_words(),
        }

    def by_group(self, assignment: dict[int, str] | None = None) -> Any:
        """:class:`~diffattr.attribution.scores.groups.GroupScores` of these scores: per target
        and group, the summed score, its share and the strongest members. ``assignment``:
        training id → group (default: :attr:`groups`, else the training images' own groups,
        e.g. digit classes or emoji categories); None when there are no groups."""
        from diffattr.attribution.methods import METHODS
        from diffattr.attribution.scores.groups import group_scores

        assignment = assignment if assignment is not None else self.groups
        if assignment is None and self.train_names is not None and self.train_names.groups:
            names = self.train_names
            assignment = dict(zip(names.ids.tolist(), names.groups, strict=True))
        if not assignment:
            return None
        cls = METHODS.get(self.method)
        additive = bool(cls is not None and cls.additive)
        return group_scores(self.values, self.train_ids, assignment, additive)

    def names_meta(self) -> dict[str, Any] | None:
        """The ``meta.json`` entry ``targets``: per target its ``source`` and ``caption``."""
        if self.target_names is None:
            return None
        n = self.target_names
        return {"source": n.column("source", self.target_ids),
                "caption": n.column("caption", self.target_ids)}  # fmt: skip

    def save(self, out_dir: str | Path, k: int = 10) -> Path:
        """Write ``scores.npy``, ``meta.json`` and top-k tables (``topk.csv``, ``topk.json``).

        ``meta.json`` gains ``confidence`` (definition, per-target κ, held-out percentile and
        bin), ``targets`` (per-target source and caption) and, when set, ``near_copy``; each
        ``topk.json`` row carries its target's ``source``, ``caption``, ``confidence``,
        ``confidence_percentile``, ``confidence_bin`` (and ``near_copy``), and each ranked
        training image its ``train_source``, ``train_caption`` and ``train_group``.
        :meth:`load` keeps them.

        The directory is built under a temporary name and renamed into place, so a killed
        write leaves either the previous scores or the complete new ones, never a mixture.
        """
        target = Path(out_dir)
        with atomic_directory(target) as out:
            self._write(out, k)
        return target

    def _name(self, names: Names | None, image_id: int, field_name: str) -> str | None:
        return None if names is None else names.row(image_id)[field_name]

    def _ranked(self, ids: np.ndarray, vals: np.ndarray) -> list[dict[str, Any]]:
        """One target's ranked training images, as ``topk.json`` lists them."""
        out = []
        for i, v in zip(ids, vals, strict=True):
            if np.isfinite(v):
                row = {"train_id": int(i), "score": float(v)}
                for f in FIELDS:
                    row[f"train_{f}"] = self._name(self.train_names, int(i), f)
                out.append(row)
        return out

    def topk_rows(self, k: int = 10) -> list[dict[str, Any]]:
        """Per target, as ``topk.json`` lists it: id, source, caption, its ``k`` proponents and
        opponents (id, score, source, caption, group), κ with its held-out percentile and
        bin, and the near-copy flag when checked."""
        pro_ids, pro = self.top_k(k)
        opp_ids, opp = self.top_k(k, opponents=True)
        conf = self.confidence_meta()
        near = self.near_copy_flags()
        pct = conf["heldout_percentile"]
        rows = []
        for t, tid in enumerate(self.target_ids.tolist()):
            rows.append({
                "target_id": int(tid),
                "source": self._name(self.target_names, int(tid), "source"),
                "caption": self._name(self.target_names, int(tid), "caption"),
                "proponents": self._ranked(pro_ids[t], pro[t]),
                "opponents": self._ranked(opp_ids[t], opp[t]),
                "confidence": conf["values"][t],
                "confidence_percentile": None if pct is None else pct[t],
                "confidence_bin": conf["bins"][t],
                **({} if near is None else {"near_copy": bool(near[t])}),
            })  # fmt: skip
        return rows

    def _write(self, out: Path, k: int) -> None:
        atomic_write(out / "scores.npy", lambda f: np.save(f, self.values))
        atomic_write(out / "train_ids.npy", lambda f: np.save(f, self.train_ids))
        atomic_write(out / "target_ids.npy", lambda f: np.save(f, self.target_ids))
        rows = self.topk_rows(k)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(CSV_COLUMNS)
        for row in rows:
            target = [row["source"], row["caption"]]
            for kind in ("proponent", "opponent"):
                for r, entry in enumerate(row[f"{kind}s"]):
                    names = [entry[f"train_{f}"] for f in FIELDS]
                    score = f"{entry['score']:.6g}"
                    w.writerow([row["target_id"], kind, r + 1, entry["train_id"], score,
                                *(x or "" for x in names + target)])  # fmt: skip
        conf = self.confidence_meta()
        atomic_write_bytes(out / "topk.csv", buf.getvalue().encode())
        atomic_write_bytes(out / "topk.json", json.dumps(rows, indent=1).encode())
        grouped = self.by_group() if self.groups is not None else None
        if grouped is not None:
            by_target = [
                {"target_id": int(t), "groups": g}
                for t, g in zip(self.target_ids.tolist(), grouped.rows(), strict=True)
            ]
            atomic_write_json(out / "groups.json", {"meaning": grouped.meaning(),
                                                    "targets": by_target})  # fmt: skip
        meta = {"method": self.method, **self.meta, "confidence": conf}
        if self.target_names is not None:
            meta["targets"] = self.names_meta()
        atomic_write_json(out / "meta.json", meta)

    @classmethod
    def load(cls, out_dir: str | Path) -> Scores:
        out = Path(out_dir)
        if not (out / "scores.npy").is_file() or not (out / "meta.json").is_file():
            raise DiffattrError(f"no scores in {out}", hint="run `diffattr score` first")
        meta = read_json(out / "meta.json")
        method = meta.pop("method", "unknown")
        target_ids = np.load(out / "target_ids.npy")
        named = meta.pop("targets", None)
        names = None
        if isinstance(named, dict):
            names = Names(target_ids, named.get("source"), named.get("caption"))
        return cls(
            np.load(out / "scores.npy"),
            np.load(out / "train_ids.npy"),
            target_ids,
            method,
            meta,
            target_names=names,
        )


def _floats(values: np.ndarray) -> list[float | None]:
    """JSON-ready floats: None for NaN."""
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values).reshape(-1)]
