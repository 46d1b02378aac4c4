"""Numbers that say whether a model learned its data.

- Classifier confidence: a logistic-regression classifier trained on the real training images
  (when labels exist) is applied to generated images; recognisable samples get confident
  predictions, like held-out real images do. Reported with the class histogram of samples.
- Nearest-neighbour distance to the training set (RMS pixel distance in [-1,1] units), for
  generated samples and for held-out real images: samples far beyond the real images' distance
  are noise; samples at ≈ 0 are copies.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression


def nearest_neighbour_distance(queries: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """RMS pixel distance from each query image to its nearest reference image."""
    q = queries.reshape(len(queries), -1).double()
    r = reference.reshape(len(reference), -1).double()
    d2 = (q.pow(2).sum(1, keepdim=True) - 2 * q @ r.T + r.pow(2).sum(1)).clamp_min(0)
    return (d2.min(dim=1).values / q.shape[1]).sqrt().numpy()


def quality_report(
    generated: torch.Tensor,
    train: torch.Tensor,
    heldout: torch.Tensor,
    train_labels: torch.Tensor | None = None,
    heldout_labels: torch.Tensor | None = None,
    confident: float = 0.8,
) -> dict[str, float | list[int]]:
    """Quality figures of ``generated`` against real ``train`` and ``heldout`` images."""
    out: dict[str, float | list[int]] = {
        "nn_distance_generated": float(np.mean(nearest_neighbour_distance(generated, train))),
        "nn_distance_heldout": float(np.mean(nearest_neighbour_distance(heldout, train))),
    }
    if train_labels is not None:
        clf = LogisticRegression(max_iter=2000, C=0.5)
        clf.fit(train.reshape(len(train), -1).numpy(), train_labels.numpy())
        p_gen = clf.predict_proba(generated.reshape(len(generated), -1).numpy())
        out["confident_fraction_generated"] = float(np.mean(p_gen.max(1) >= confident))
        out["class_histogram_generated"] = np.bincount(
            clf.classes_[p_gen.argmax(1)], minlength=len(clf.classes_)
        ).tolist()
        p_val = clf.predict_proba(heldout.reshape(len(heldout), -1).numpy())
        out["confident_fraction_heldout"] = float(np.mean(p_val.max(1) >= confident))
        if heldout_labels is not None:
            out["classifier_accuracy_heldout"] = float(
                np.mean(clf.classes_[p_val.argmax(1)] == heldout_labels.numpy())
            )
    return out
