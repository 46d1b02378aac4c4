"""Group attribution: which *part* of the training data made a target — a class, a category, a
source, a licence — from any method's per-image scores.

A group's score S_g(x) and its share S_g / Σ_h |S_h| (signed; the shares' absolute values add
up to 1) depend on what the method's scores are (``Method.additive``):

- **additive** methods (DAS, D-TRAK, TRAK, Journey-TRAK, gradient dot products, EK-FAC,
  TracIn, AbU): τ estimates how much removing zᵢ would change the target (the datamodel view
  of the LDS), and such estimates add, so the sum S_g(x) = Σ_{i∈g} τ(x, zᵢ) estimates the
  effect of removing the whole group — to first order: removing many images at once is not the
  sum of removing each. Members outside a screen's candidates count 0;
- the others (cosine similarities, normalised influences, MUCS's skew, combinations, random):
  S_g(x) is the mean of its scored members' scores, a ranking of groups without an effect
  behind it (a sum would rank large groups first whatever their members look like).

Groups come from the training set's own labels (digit classes, emoji categories) or from a
file (:func:`read_groups`); images in no group form the group :data:`NO_GROUP`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.errors import DataError

#: The group of training images that a groups file does not name.
NO_GROUP = "(no group)"
#: Members listed per group and target (its strongest).
TOP_MEMBERS = 3


def read_groups(path: str | Path, names: Any) -> dict[int, str]:
    """Training id → group from a CSV (``image,group`` rows; a header row is allowed) or JSON
    (``{"image": "group", …}``) file, each image named by its id or its file (its
    ``source``, as ``names`` — a :class:`~.names.Names` of the training set — gives it). An
    image the training set does not have, or a malformed line, is a :class:`DataError`
    naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"groups file {path} does not exist")
    by_source = {s: int(i) for i, s in zip(names.ids.tolist(), names.sources or [], strict=False)}
    known = set(names.ids.tolist())
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read groups file {path}: {exc}") from exc
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected an object mapping images to groups")
        rows = [(f"key {k!r}", str(k), v) for k, v in data.items()]
    else:
        rows = []
        for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise DataError(
                    f"{path}, line {lineno}: expected two columns (image, group), got {len(row)}"
                )
            if lineno == 1 and row[0].strip().lower() in ("image", "id", "file", "train_id"):
                continue  # a header
            rows.append((f"line {lineno}", row[0], row[1]))
    out: dict[int, str] = {}
    for where, image, group in rows:
        if not isinstance(group, str) or not group.strip():
            raise DataError(f"{path}, {where}: the group must be a non-empty name")
        image = image.strip()
        image_id = by_source.get(image)
        if image_id is None and image.lstrip("-").isdigit():
            image_id = int(image) if int(image) in known else None
        if image_id is None:
            raise DataError(
                f"{path}, {where}: {image!r} is neither a training image's id nor its file",
                hint="name training images by id (as in topk.csv) or by file (train_source)",
            )
        out[image_id] = group.strip()
    return out


@dataclass
class GroupScores:
    """Per target and group: the score S_g, the share, and the strongest members."""

    groups: list[str]
    values: np.ndarray  # (T, G) S_g
    shares: np.ndarray  # (T, G) S_g / Σ_h |S_h|
    sizes: list[int]
    top_members: list[list[list[tuple[int, float]]]]  # [target][group] → [(id, score)]
    additive: bool

    def meaning(self) -> str:
        """What a group's score means for this method (module docstring)."""
        if self.additive:
            return ("the sum of its members' scores: the estimated change of the target when "
                    "the group is removed (first order)")  # fmt: skip
        return "the mean of its members' scores (a ranking of groups, not an estimated effect)"

    def rows(self) -> list[dict[str, Any]]:
        """Per target, its groups by decreasing score: name, score, share, size, members."""
        out = []
        for t in range(self.values.shape[0]):
            order = np.argsort(-self.values[t], kind="stable")
            out.append([
                {
                    "group": self.groups[g],
                    "score": float(self.values[t, g]),
                    "share": float(self.shares[t, g]),
                    "size": self.sizes[g],
                    "top_members": [
                        {"train_id": i, "score": s} for i, s in self.top_members[t][g]
                    ],
                }
                for g in order
            ])  # fmt: skip
        return out


def group_scores(
    values: np.ndarray, train_ids: np.ndarray, assignment: dict[int, str], additive: bool
) -> GroupScores:
    """:class:`GroupScores` of (T, N) scores over training images ``train_ids``, grouped by
    ``assignment`` (id → group; others in :data:`NO_GROUP`): sums for ``additive`` scores, NaN
    (outside a screen) counting 0; else means over the scored (finite) members."""
    labels = [assignment.get(int(i), NO_GROUP) for i in np.asarray(train_ids).tolist()]
    groups = sorted(set(labels), key=lambda g: (g == NO_GROUP, g))
    index = {g: j for j, g in enumerate(groups)}
    member = np.asarray([index[g] for g in labels])
    raw = np.asarray(values, dtype=np.float64)
    v = np.nan_to_num(raw, nan=0.0)
    one_hot = np.zeros((v.shape[1], len(groups)))
    one_hot[np.arange(v.shape[1]), member] = 1.0
    sums = v @ one_hot
    if not additive:
        counts = np.isfinite(raw).astype(np.float64) @ one_hot
        sums = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    total = np.abs(sums).sum(axis=1, keepdims=True)
    shares = np.divide(sums, total, out=np.zeros_like(sums), where=total > 0)
    ids = np.asarray(train_ids)
    top: list[list[list[tuple[int, float]]]] = []
    for t in range(v.shape[0]):
        per_group = []
        for j in range(len(groups)):
            cols = np.flatnonzero(member == j)
            best = cols[np.argsort(-v[t, cols], kind="stable")[:TOP_MEMBERS]]
            per_group.append([(int(ids[c]), float(v[t, c])) for c in best])
        top.append(per_group)
    sizes = np.bincount(member, minlength=len(groups)).tolist()
    return GroupScores(groups, sums, shares, sizes, top, additive)
