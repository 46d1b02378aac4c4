"""What each image is, by id: its source, caption and group, for every answer that names it.

**Ids** are the dataset's stable ids: for a folder, positions in the sorted listing of the
*whole* folder (held-out images included); for an ``.npz``, its ``ids`` array or row numbers;
for a built-in set, its original order. A run's training and held-out images keep the ids of
the full dataset, so ids are not positions in the training set.

**Source**: the file path relative to the data folder (``sub/cat.png``), ``npz:INDEX`` for a
row of an ``.npz``, the built-in name (``digits:17``, ``emoji:1f600.png``), or, for a generated
target, its row of the samples file (``samples.npz:3``). **Caption**: the image's caption (a
text-to-image target's prompt). **Group**: the name of its label (e.g. an emoji category), or
the label number when the labels have no names. Any of them is None where the data have none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The keys of one image's name (:meth:`Names.row`).
FIELDS = ("source", "caption", "group")


def _numpy_ids(ids: Any) -> np.ndarray:
    a = ids.detach().cpu().numpy() if hasattr(ids, "detach") else np.asarray(ids)
    return a.astype(np.int64).reshape(-1)


def _groups(labels: Any, label_names: Sequence[str] | None) -> list[str] | None:
    """Label names per image (the label number where it has no name); None without labels."""
    if labels is None:
        return None
    values = _numpy_ids(labels).tolist()
    names = list(label_names or [])
    return [names[v] if 0 <= v < len(names) else str(v) for v in values]


@dataclass
class Names:
    """Per image id: source, caption and group (module docstring); a column is None when
    unknown for every image."""

    ids: np.ndarray
    sources: list[str] | None = None
    captions: list[str] | None = None
    groups: list[str] | None = None

    def __post_init__(self) -> None:
        self.ids = _numpy_ids(self.ids)
        for name in ("sources", "captions", "groups"):
            column = getattr(self, name)
            if column is not None and len(column) != self.ids.size:
                raise ValueError(f"{len(column)} {name} for {self.ids.size} ids")
        self._pos = {int(i): p for p, i in enumerate(self.ids.tolist())}

    @classmethod
    def of(cls, dataset: Any, ids: Any = None) -> Names:
        """The names of a dataset's images: its ``sources``, ``captions`` and ``labels``
        (named by ``label_names``), whichever it has (an ``ImageDataset``, a text-to-image
        ``LatentSet``, …), keyed by its ``ids`` or, row for row, by ``ids`` when given."""
        return cls(
            dataset.ids if ids is None else ids,
            _strings(getattr(dataset, "sources", None)),
            _strings(getattr(dataset, "captions", None)),
            _groups(getattr(dataset, "labels", None), getattr(dataset, "label_names", None)),
        )

    def row(self, image_id: int) -> dict[str, str | None]:
        """``{"source", "caption", "group"}`` of one id (all None for an unknown id)."""
        p = self._pos.get(int(image_id))
        columns = (self.sources, self.captions, self.groups)
        return {
            k: None if c is None or p is None else c[p]
            for k, c in zip(FIELDS, columns, strict=True)
        }

    def column(self, field: str, ids: Any) -> list[str | None]:
        """One field (``source``, ``caption`` or ``group``) of each id in ``ids``."""
        return [self.row(i)[field] for i in _numpy_ids(ids).tolist()]

    def label(self, image_id: int) -> str:
        """One line naming an image: ``#ID source · caption · group`` (what is known)."""
        parts = [v for v in self.row(image_id).values() if v]
        return f"#{int(image_id)}" + (" " + " · ".join(parts) if parts else "")


def _strings(values: Any) -> list[str] | None:
    return None if values is None else [str(v) for v in values]


def generated_names(ids: Any, samples_file: str, prompts: Sequence[str] | None = None) -> Names:
    """Names of generated targets: ``FILE:ROW`` (the row of the samples file) and the prompt."""
    ids = _numpy_ids(ids)
    sources = [f"{samples_file}:{r}" for r in range(ids.size)]
    return Names(ids, sources, None if prompts is None else [str(p) for p in prompts])
