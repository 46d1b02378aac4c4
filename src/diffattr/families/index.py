"""An attribution index: what a query needs, precomputed once per run, method and settings.

``diffattr score`` featurizes the training set (once, stored), fits the kernel and scores
held-out images for κ's reference on every call. An index keeps those in ``RUN/index/NAME``:

- the kernel's factorisation — the Cholesky factor of G = ΦᵀΦ + λI (primal) or of
  ΦΦᵀ + λI (dual), with λ resolved by the method's rule — over the run's stored training
  features (``RUN/features``, referenced, not copied);
- κ's reference: the confidence of the first held-out images scored the same way;
- ``meta.json``: everything the answers depend on (the method and its resolved options, the
  feature settings, the λ rule, the screen, the model's and the training data's fingerprints,
  the held-out ids), written last, with the stamp (size, modification time) of the training
  features it was fitted on. An index is reused only when all of it matches; other inputs build
  a new one beside it (the name carries a hash of the settings), and features written again
  since rebuild it.

A query (:meth:`AttributionIndex.score`) then featurizes only its targets — into a temporary
directory, so the run directory is never changed by a query — and solves against the stored
factor: the same :class:`~diffattr.attribution.kernel.Kernel` code as ``diffattr score``, so
the answers are the same. Image methods (pixel, embedding, random) index only κ's reference;
methods that compute their own features from the model per target (EK-FAC, the unlearning
methods, Journey-TRAK, TracIn, ensembles, combinations) are refused with the reason.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.errors import ConfigError, DiffattrError
from diffattr.fsio import atomic_write, atomic_write_json

INDEX_VERSION = 1


class AttributionIndex:
    """A run's precomputed scoring state for one method (module docstring); built or loaded
    by :meth:`open`, queried by :meth:`score`."""

    def __init__(self, bound: Any, att: Any, path: Path, screen: Any, reference: Any) -> None:
        self.bound, self.attributor, self.path, self.screen = bound, att, path, screen
        #: (κ of the first held-out images, their ids), or None (no held-out images).
        self.reference = reference

    # ------------------------------------------------------------------ building and loading
    @classmethod
    def open(
        cls,
        bound: Any,
        name: str,
        given: dict[str, Any] | None = None,
        settings: Any = None,
        screen: Any = None,
        build: bool = True,
        **kwargs: Any,
    ) -> AttributionIndex:
        """The index of method ``name`` on ``bound`` (a :class:`~.bound.BoundRun`): loaded
        when one with the same inputs exists, else built (``build``) or refused naming the
        command that builds it. ``kwargs``: λ, batch size, device, progress."""
        att = bound.attributor(name, given, settings, **kwargs)
        check_indexable(att.method)
        meta = index_meta(bound, att, screen)
        path = bound.run.path / "index" / index_name(meta)
        if (path / "meta.json").is_file():
            have = json.loads((path / "meta.json").read_text())
            store = have.get("train_store")
            current = store is None or have.get("store_stamp") == store_stamp(
                bound.run.features_dir / store
            )
            if have.get("inputs") == meta and current:
                return cls._load(bound, att, path, screen, have)
        if not build:
            raise DiffattrError(
                f"{bound.run.path} has no index of {meta['label']} with these settings",
                hint=f"build it: `diffattr index {bound.run.path} --method '{meta['label']}'` "
                "(with the same feature options)",
            )
        return cls._build(bound, att, path, screen, meta)

    @classmethod
    def _build(cls, bound, att, path: Path, screen: Any, inputs: dict) -> AttributionIndex:
        path.mkdir(parents=True, exist_ok=True)
        (path / "meta.json").unlink(missing_ok=True)  # a stale index is not valid meanwhile
        meta: dict[str, Any] = {"inputs": inputs}
        if att.method.measure is not None:
            kernel = att.kernel() if att.method.uses_kernel else None
            store = att.featurize()
            if kernel is not None:
                atomic_write(path / "factor.npy", lambda f: np.save(f, kernel.factor))
                meta["kernel"] = {"lam": kernel.lam, "form": kernel.form, "block": kernel.block}
            meta["train_store"] = store.path.name
            meta["store_stamp"] = store_stamp(store.path)
        reference = None
        if att.method.heldout_reference:
            images, ids = bound.heldout()
            reference = heldout_reference(att, images, ids, screen)
        if reference is not None:
            atomic_write(
                path / "reference.npz",
                lambda f: np.savez(f, kappa=reference[0], ids=reference[1]),
            )
        atomic_write_json(path / "meta.json", meta)
        return cls(bound, att, path, screen, reference)

    @classmethod
    def _load(cls, bound, att, path: Path, screen: Any, meta: dict) -> AttributionIndex:
        from diffattr.attribution.features.store import FeatureStore
        from diffattr.attribution.kernel import Kernel

        if "kernel" in meta:
            store = FeatureStore.load(bound.run.features_dir / meta["train_store"])
            factor = np.load(path / "factor.npy", mmap_mode="r")
            k = meta["kernel"]
            lam, form, block = float(k["lam"]), k["form"], int(k["block"])
            kernel = Kernel(store.features, lam, form, factor, block, keep_mapped=True)
            att.use_kernel(kernel, store)
        reference = None
        if (path / "reference.npz").is_file():
            with np.load(path / "reference.npz") as z:
                reference = (z["kappa"], z["ids"])
        return cls(bound, att, path, screen, reference)

    # ------------------------------------------------------------------ queries
    def score(self, spec_or_targets: Any, ids: np.ndarray | None = None, cache: bool = True) -> Any:
        """:class:`~diffattr.attribution.scores.Scores` of targets — a spec as ``diffattr
        score`` takes it (``samples``, ``val``, an image file, a folder, an ``.npz``; kept
        loaded when ``cache``), or targets as the attributor takes them with their ``ids`` —
        with κ's held-out reference; the target features go to a temporary directory, never
        the run."""
        att = self.attributor
        if isinstance(spec_or_targets, str):
            _, targets, ids = self.bound.targets(spec_or_targets, att.method, cache)
        else:
            targets = spec_or_targets
        with att.temporary_target_store():
            scores = att.score(targets, ids, screen=self.screen)
        if self.reference is not None:
            scores.set_confidence_reference(*self.reference)
        return scores

    def remove(self) -> None:
        """Delete this index (the run's features stay)."""
        shutil.rmtree(self.path, ignore_errors=True)


def store_stamp(path: Path) -> list[int] | None:
    """(size, modification time) of a feature store's features file: an index over a store
    written again since (e.g. featurized anew with another thread count) is rebuilt."""
    f = Path(path) / "features.npy"
    if not f.is_file():
        return None
    st = f.stat()
    return [st.st_size, st.st_mtime_ns]


def check_indexable(method: Any) -> None:
    """A :class:`ConfigError` for a method whose every target needs the model itself."""
    if method.needs_model:
        raise ConfigError(
            f"{method.name} computes its own features from the model for every target, so an "
            "index would precompute nothing",
            hint="index a kernel method (das, dtrak, trak, …) or an image method; score "
            f"{method.name} with `diffattr score`",
        )


def heldout_reference(att: Any, images: Any, ids: np.ndarray, screen: Any) -> Any:
    """(κ, ids) of the first held-out images scored as targets (κ's reference, as
    :meth:`~diffattr.attribution.attributor.Attributor.compare_to_heldout` takes it)."""
    if not len(ids):
        return None
    with att.temporary_target_store():
        return att.heldout_confidence(images, ids, screen)


def index_meta(bound: Any, att: Any, screen: Any) -> dict[str, Any]:
    """Everything an index's answers depend on (compared in full when it is reused)."""
    from diffattr.attribution.attributor import describe_lambda
    from diffattr.attribution.methods import method_meta
    from diffattr.attribution.methods.spec import method_label
    from diffattr.diffusion.presets import model_fingerprint

    options = method_meta(att.method)["options"]
    _, heldout_ids = bound.heldout() if att.method.heldout_reference else (None, [])
    meta = {
        "version": INDEX_VERSION,
        "label": method_label(att.method.name, options),
        "method": att.method.name,
        "options": options,
        "features": att.settings.to_dict() if att.method.measure is not None else None,
        "lambda_rule": describe_lambda(att.lam, att.method) if att.method.uses_kernel else None,
        "screen": None if screen is None else screen.describe(),
        "model_fingerprint": model_fingerprint(att.model),
        "data_fingerprint": att.train.fingerprint(),
        "heldout_ids": np.asarray(heldout_ids).tolist(),
    }
    return json.loads(json.dumps(meta))  # as it reads back from meta.json


def index_name(meta: dict[str, Any]) -> str:
    """``LABEL-HASH``: the method's label and a short hash of everything in ``meta``."""
    blob = json.dumps(meta, sort_keys=True).encode()
    safe = "".join(c if c.isalnum() or c in "-_=." else "_" for c in meta["label"])
    return f"{safe}-{hashlib.sha256(blob).hexdigest()[:10]}"
