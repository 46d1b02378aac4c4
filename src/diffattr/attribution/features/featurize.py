"""Featurize a set of images into a :class:`FeatureStore`: gradients → projection → rows.

Resumable: only rows whose done flag is unset are computed; a killed run continues where it
stopped and ends with exactly the features of an uninterrupted run (every row depends only on
the sample, the settings and the model).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.attribution.defaults import DEFAULT_TIMESTEPS
from diffattr.attribution.features.gradients import (
    GradientComputer,
    TimestepSpec,
    grad_dtype,
    gradient_memory,
    select_parameters,
)
from diffattr.attribution.features.layer_projection import DEFAULT_LOGRA_RANK, LayerProjection
from diffattr.attribution.features.measure import parse_measure
from diffattr.attribution.features.pairs import PairSource
from diffattr.attribution.features.projection import (
    PassThroughProjector,
    Projector,
    make_projector,
    trak_cuda_available,
)
from diffattr.attribution.features.store import FeatureStore
from diffattr.diffusion.presets import model_fingerprint
from diffattr.diffusion.schedule import NoiseSchedule
from diffattr.errors import ConfigError, NumericalError, notice, warn
from diffattr.fsio import first_missing_ancestor
from diffattr.parallel import ProgressBar

#: Full per-sample gradients are stored unprojected (exact kernel) up to this many bytes.
DEFAULT_MAX_EXACT_BYTES = 4 * 2**30
DEFAULT_PROJECTION = ("countsketch", 32768)


@dataclass(frozen=True)
class FeatureSettings:
    """Everything that determines a feature row besides the model and the image."""

    measure: str = "das"
    timesteps: int = DEFAULT_TIMESTEPS
    timestep_strategy: str = "uniform"
    normalize: bool = True
    noise_seed: int = 0
    params: str | None = None
    projector: str = "auto"
    proj_dim: int | None = None
    proj_seed: int = 0
    grad_dtype: str = "fp32"

    def timestep_spec(self) -> TimestepSpec:
        return TimestepSpec(self.timesteps, self.timestep_strategy, self.noise_seed)

    def to_dict(self) -> dict[str, Any]:
        """The settings; ``grad_dtype`` only when not fp32 (stores made before it keep their
        names)."""
        d = asdict(self)
        if d["grad_dtype"] == "fp32":
            del d["grad_dtype"]
        return d

    def key(self) -> str:
        """Short stable hash naming a store directory for these settings."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    def resolved(self, num_params: int, num_train: int, max_exact_bytes: int) -> FeatureSettings:
        """Settle ``projector="auto"``: exact (identity) when N·p·4 bytes fit, else a sketch."""
        if self.projector != "auto":
            return self
        if num_train * num_params * 4 <= max_exact_bytes:
            return replace(self, projector="identity", proj_dim=None)
        kind, dim = DEFAULT_PROJECTION
        return replace(self, projector=kind, proj_dim=self.proj_dim or min(dim, num_params - 1))


def gradient_computer(
    model: torch.nn.Module,
    settings: FeatureSettings,
    schedule: NoiseSchedule,
    image_shape: tuple[int, ...],
    device: str = "cpu",
    micro_batch: int | None = None,
    pairs: PairSource | None = None,
) -> GradientComputer:
    """The :class:`GradientComputer` that ``settings`` describe (measure, timesteps, params;
    with ``--projector logra`` it projects per layer itself). ``micro_batch`` None lets the
    computer size its passes (``layers``: whole samples, as many pairs as memory holds up to
    AUTO_MAX_PAIRS; a fixed 64 split each sample's K = 100 timesteps into two passes of 50).
    ``pairs``: which pairs a sample's gradient averages over (default: the settings' K
    timesteps of the noised image, :class:`~.pairs.NoisedPairs`)."""
    layer_projection = None
    if settings.projector == "logra":
        layer_projection = LayerProjection(
            rank=settings.proj_dim or DEFAULT_LOGRA_RANK, seed=settings.proj_seed
        )
    return GradientComputer(
        model,
        parse_measure(settings.measure, image_shape),
        schedule,
        settings.timestep_spec(),
        noise_seed=settings.noise_seed,
        normalize=settings.normalize,
        param_names=select_parameters(model, settings.params),
        micro_batch=micro_batch,
        device=device,
        dtype=grad_dtype(settings.grad_dtype),
        layer_projection=layer_projection,
        pairs=pairs,
    )


def with_available_projector(settings: FeatureSettings, device: str) -> FeatureSettings:
    """``settings``, with ``trak-cuda`` replaced by ``rademacher`` (and a one-line warning)
    when traker's CUDA projector cannot run on ``device``."""
    if settings.projector != "trak-cuda" or trak_cuda_available(device):
        return settings
    why = "needs a CUDA device" if torch.device(device).type != "cuda" else "fast_jl not found"
    warn(f"--projector trak-cuda {why}; using the rademacher projector instead")
    return replace(settings, projector="rademacher")


def build_projector(
    settings: FeatureSettings,
    num_params: int,
    device: str,
    computer: GradientComputer | None = None,
) -> Projector:
    """The projector applied to ``computer``'s gradients (a pass-through that records the
    per-layer projection when the computer projects them itself: ``logra``)."""
    if settings.projector == "auto":
        raise ConfigError("resolve the 'auto' projector before building it")
    if settings.projector == "logra":
        if computer is None or computer.layer_projector is None:
            raise ConfigError("--projector logra is applied by the gradient computer")
        return PassThroughProjector(computer.dim, computer.layer_projector.describe())
    return make_projector(
        settings.projector, num_params, settings.proj_dim, seed=settings.proj_seed, device=device
    )


NONFINITE_POLICIES = ("stop", "skip")
#: Bytes of unprojected per-sample gradients held at once while featurizing (a featurize
#: batch of 32 samples of a 35.7M-parameter UNet would be 4.6 GB): larger batches are
#: computed and projected in groups of samples. The groups depend only on the batch, so a
#: sharded run (shards start at batch boundaries) still matches one process as long as both
#: see the same cap. On the CPU by default; see :func:`gradient_memory` for CUDA and the
#: ``DIFFATTR_GRADIENT_MEMORY_MIB`` override.
GRADIENT_BLOCK_BYTES = 1 << 29


def featurize(
    model: torch.nn.Module,
    images: torch.Tensor,
    ids: np.ndarray,
    store_dir: str | Path,
    settings: FeatureSettings,
    schedule: NoiseSchedule,
    data_fingerprint: str,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "featurize",
    rows: np.ndarray | None = None,
    source: FeatureStore | None = None,
    on_nonfinite: str = "stop",
    wait_interval: float = 0.2,
    conditioning: torch.Tensor | None = None,
    pairs: PairSource | None = None,
) -> FeatureStore:
    """Compute φ for every image (or the given ``rows``) not yet in the store at ``store_dir``.

    ``conditioning`` (N, …): per-image input of a conditional model (caption embeddings of a
    text-to-image UNet), passed with x_t and t; ``data_fingerprint`` must cover it.

    ``pairs``: the pairs each image's gradient averages over, when not the noised image at
    the settings' timesteps (Journey-TRAK's trajectory points); recorded in the store.

    ``source``: a complete unprojected (identity) store of the same model, measure, timesteps
    and images; its rows ḡ are projected (φ = Pᵀḡ, exact since projection is linear) instead
    of recomputing gradients.

    ``on_nonfinite``: a sample whose gradient or features are NaN/Inf stops the run with an
    error naming it (``"stop"``), or is recorded in the store as skipped — zero features, so
    it scores 0 — with a warning naming the sample ids (``"skip"``).

    Several processes may featurize one store at once (e.g. disjoint ``rows``): each row is
    claimed before it is computed (see :mod:`.store`); rows another live
    process is computing are waited for, polling every ``wait_interval`` seconds, and the
    call says so on stderr.
    """
    if settings.projector == "auto":
        raise ConfigError("resolve the 'auto' projector (FeatureSettings.resolved) first")
    settings = with_available_projector(settings, device)
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ConfigError(
            f"--on-nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {on_nonfinite!r}"
        )
    for name in ("noise_seed", "proj_seed"):
        if getattr(settings, name) < 0:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be non-negative, got {getattr(settings, name)}")
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    batch_size = int(batch_size)
    ids = np.asarray(ids, dtype=np.int64)
    if images.shape[0] != ids.size:
        raise ConfigError(f"{images.shape[0]} images but {ids.size} ids")
    if rows is not None:
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if rows.size == 0:
            raise ConfigError("--rows selects no rows")
        if rows[0] < 0 or rows[-1] >= ids.size:
            raise ConfigError(
                f"--rows {int(rows[0])}:{int(rows[-1]) + 1} is outside the {ids.size} rows "
                f"(0:{ids.size}) of these images"
            )
    computer = gradient_computer(
        model, settings, schedule, tuple(images.shape[1:]), device, pairs=pairs
    )
    measure = computer.measure
    projector = build_projector(settings, computer.dim, device, computer)
    store_settings = {
        "features": settings.to_dict(),
        "projector": projector.describe(),
        "measure": measure.describe(),
        "schedule": schedule.to_dict(),
        "model_fingerprint": model_fingerprint(model),
        "data_fingerprint": data_fingerprint,
        **computer.pair_source.describe(),
        "num_params": computer.num_params,
        "ids": ids.tolist(),
    }
    store_dir = Path(store_dir)
    new_parent = first_missing_ancestor(store_dir.parent)
    try:
        store = FeatureStore.open(store_dir, store_settings, len(ids), projector.output_dim)
    except BaseException:
        _remove_empty_dirs(store_dir.parent, new_parent)
        raise
    if source is not None and not _same_gradients(source, store_settings):
        source = None
    todo = store.missing_rows()
    if rows is not None:
        todo = np.intersect1d(todo, rows)
    if todo.size == 0:
        store.claims().clear_finished(store.done)
        return store
    run = _Filler(store, computer, projector, images, ids, source, on_nonfinite, batch_size)
    run.conditioning = conditioning
    try:
        with ProgressBar(total=todo.size, desc=desc, unit="img", disable=not progress) as bar:
            run.fill(todo, bar, wait_interval)
    except BaseException:
        run.claims.release_all()
        if store.created and store.num_done == 0 and not run.claims.active():
            shutil.rmtree(store.path, ignore_errors=True)  # leave nothing half-made behind
            _remove_empty_dirs(store_dir.parent, new_parent)
        raise
    run.claims.release_all()
    run.claims.clear_finished(store.done)
    run.report()
    return store


def _remove_empty_dirs(path: Path, outermost: Path | None) -> None:
    """Remove ``path`` and its parents up to ``outermost`` while they are empty."""
    if outermost is None:
        return
    path, outermost = path.absolute(), outermost.absolute()
    while True:
        try:
            path.rmdir()
        except OSError:
            return
        if path == outermost or outermost not in path.parents:
            return
        path = path.parent


def _ranges(rows: list[int] | np.ndarray) -> str:
    """Compact text of row indices: ``0–11, 14, 20–23``."""
    rows = sorted(int(r) for r in rows)
    parts: list[str] = []
    start = prev = None
    for r in [*rows, None]:
        if r is not None and prev is not None and r == prev + 1:
            prev = r
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}–{prev}")
        start = prev = r
    return ", ".join(parts)


def _id_list(values: np.ndarray, limit: int = 20) -> str:
    values = [int(v) for v in values]
    text = ", ".join(map(str, values[:limit]))
    return text + (f" and {len(values) - limit} more" if len(values) > limit else "")


class _Filler:
    """Computes and writes claimed rows of one store; remembers what others did."""

    def __init__(self, store, computer, projector, images, ids, source, on_nonfinite, batch):
        self.store, self.computer, self.projector = store, computer, projector
        self.images, self.ids, self.source = images, ids, source
        self.on_nonfinite, self.batch_size = on_nonfinite, batch
        self.claims = store.claims()
        #: Samples whose (group × p) float32 gradients fit in the gradient memory cap.
        budget = gradient_memory(GRADIENT_BLOCK_BYTES, computer.device)
        self.group = max(1, budget // (4 * computer.dim))
        self.by_others: dict[int | None, list[int]] = {}  # pid -> rows they finished
        self.taken_over: dict[int | None, list[int]] = {}  # dead pid -> rows we took over
        self.skipped: list[int] = []
        self.conditioning: torch.Tensor | None = None
        self._announced: set[int | None] = set()
        #: One buffer for every group's unprojected gradients (GradientComputer.compute's
        #: ``out``), allocated on first use: the operating system maps fresh pages for a new
        #: (group × p) block on every call otherwise (on the `tiny` UNet at K = 4, with glibc's
        #: default thresholds, that was 15% of the gradient time).
        self._gradient_buffer: torch.Tensor | None = None

    def fill(self, todo: np.ndarray, bar, wait_interval: float) -> None:
        queue = [int(r) for r in todo]
        waiting: dict[int, int | None] = {}
        while queue or waiting:
            batch: list[int] = []
            rest: list[int] = []
            for i, r in enumerate(queue):
                if len(batch) == self.batch_size:
                    rest = queue[i:]
                    break
                if self.store.done[r] != 0:
                    self._finished_elsewhere(r, waiting.pop(r, None), bar)
                    continue
                claim = self.claims.try_claim(r)
                if not claim.acquired:
                    waiting[r] = claim.pid
                    continue
                if self.store.done[r] != 0:  # finished between our check and our claim
                    self.claims.release(r)
                    self._finished_elsewhere(r, waiting.pop(r, None), bar)
                    continue
                waiting.pop(r, None)
                if claim.stale:
                    self.taken_over.setdefault(claim.pid, []).append(r)
                batch.append(r)
            queue = rest
            if batch:
                self._compute(np.asarray(batch, dtype=np.int64))
                for r in batch:
                    self.claims.release(r)
                bar.update(len(batch))
                continue
            if not waiting:
                continue
            self._announce_waiting(waiting)
            time.sleep(wait_interval)
            queue = sorted(waiting)  # try again: finished, still claimed, or abandoned

    def _finished_elsewhere(self, row: int, pid: int | None, bar) -> None:
        self.by_others.setdefault(pid, []).append(row)
        bar.update(1)

    def _announce_waiting(self, waiting: dict[int, int | None]) -> None:
        by_pid: dict[int | None, list[int]] = {}
        for r, pid in waiting.items():
            by_pid.setdefault(pid, []).append(r)
        for pid, rows in by_pid.items():
            if pid in self._announced:
                continue
            self._announced.add(pid)
            who = f"PID {pid}" if pid is not None else "another process"
            notice(
                f"rows {_ranges(rows)} of feature store {self.store.path} are being computed "
                f"by {who}; waiting for them instead of computing them twice"
            )

    def report(self) -> None:
        for pid, rows in self.taken_over.items():
            who = f"PID {pid}" if pid is not None else "a process"
            notice(
                f"took over rows {_ranges(rows)} of feature store {self.store.path}, claimed "
                f"by {who} which is no longer running"
            )
        for pid, rows in self.by_others.items():
            who = f"PID {pid}" if pid is not None else "another process"
            notice(
                f"rows {_ranges(rows)} of feature store {self.store.path} were computed by "
                f"{who}, not here"
            )
        if self.skipped:
            sk = np.asarray(self.skipped)
            warn(
                f"skipped {sk.size} sample(s) with non-finite gradients or features "
                f"(sample ids {_id_list(self.ids[sk])}) in feature store {self.store.path}; "
                "they are stored as zeros and score 0"
            )

    # ------------------------------------------------------------------ computing
    def _features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Projected features, error and residual of ``batch``'s rows, computed in groups of
        ``self.group`` samples (copies: a group's features may view the reused buffer)."""
        result: list[np.ndarray] = []
        for s in range(0, batch.size, self.group):
            rows = batch[s : s + self.group]
            parts = self._group_features(rows)
            if not result:
                result = [np.empty((batch.size, *p.shape[1:]), p.dtype) for p in parts]
            for whole, part in zip(result, parts, strict=True):
                whole[s : s + rows.size] = part
        return tuple(result)  # type: ignore[return-value]

    def _group_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.source is not None:
            g = torch.from_numpy(np.asarray(self.source.features[batch]))
            g = g.to(self.computer.device)
            err = torch.from_numpy(self.source.column("error")[batch])
            res = torch.from_numpy(self.source.column("residual")[batch])
        else:
            rows = torch.as_tensor(batch)
            cond = None if self.conditioning is None else self.conditioning[rows]
            g, err, res = self.computer.compute(
                self.images[rows], self.ids[batch], cond, out=self._buffer()
            )
        phi = self.projector.project(g).cpu().numpy()  # may view the buffer (identity)
        return phi, err.numpy(), res.numpy()

    def _buffer(self) -> torch.Tensor:
        """The reused gradient buffer, room for min(batch, group) samples' gradients."""
        if self._gradient_buffer is None:
            rows = min(self.batch_size, self.group)
            self._gradient_buffer = torch.empty(
                rows * self.computer.dim, dtype=torch.float32, device=self.computer.device
            )
        return self._gradient_buffer

    def _compute(self, batch: np.ndarray) -> None:
        try:
            phi, err, res = self._features(batch)
        except NumericalError as exc:
            if self.on_nonfinite == "stop":
                raise NumericalError(str(exc), hint=_STOP_HINT) from exc
            self._compute_one_by_one(batch)
            return
        finite = np.isfinite(phi).all(axis=1) & np.isfinite(err) & np.isfinite(res)
        if finite.all():
            self.store.write_rows(batch, phi, error=err, residual=res)
            return
        if self.on_nonfinite == "stop":
            bad = int(batch[~finite][0])
            raise NumericalError(
                f"non-finite features for sample id {int(self.ids[bad])} (row {bad}) in "
                f"feature store {self.store.path}",
                hint=_STOP_HINT,
            )
        good = batch[finite]
        if good.size:
            self.store.write_rows(good, phi[finite], error=err[finite], residual=res[finite])
        self._skip(batch[~finite])

    def _compute_one_by_one(self, batch: np.ndarray) -> None:
        for r in batch:
            one = np.asarray([r])
            try:
                phi, err, res = self._features(one)
            except NumericalError:
                self._skip(one)
                continue
            if np.isfinite(phi).all() and np.isfinite(err).all() and np.isfinite(res).all():
                self.store.write_rows(one, phi, error=err, residual=res)
            else:
                self._skip(one)

    def _skip(self, rows: np.ndarray) -> None:
        self.store.skip_rows(rows)
        self.skipped.extend(int(r) for r in rows)


_STOP_HINT = (
    "check the model and that sample; or pass --on-nonfinite skip to record such samples as "
    "skipped (they score 0)"
)


def _same_gradients(source: FeatureStore, wanted: dict[str, Any]) -> bool:
    """Whether ``source`` holds the unprojected rows of the gradients ``wanted`` describes."""
    have = source.settings
    if not source.is_complete() or have["projector"].get("kind") != "identity":
        return False
    if wanted["projector"].get("kind") == "logra":  # projected per layer, never from ḡ
        return False
    keys = ("measure", "schedule", "model_fingerprint", "data_fingerprint", "num_params", "ids")
    if any(have.get(k) != wanted.get(k) for k in keys):
        return False
    mine = {k: v for k, v in wanted["features"].items() if not k.startswith("proj")}
    theirs = {k: v for k, v in have["features"].items() if not k.startswith("proj")}
    return mine == theirs


def identity_settings(settings: FeatureSettings) -> FeatureSettings:
    """The unprojected version of ``settings`` (whose store can feed any projection)."""
    return replace(settings, projector="identity", proj_dim=None, proj_seed=0)
