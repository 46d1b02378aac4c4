"""Journey-TRAK target features: gradients along the target's own sampling trajectory.

A generated target was produced from recorded seeds by S denoising steps; step s took x_{t_s}
(recorded with ``sample(..., record_trajectory=True)``) one step further. Following Journey-TRAK
(Georgiev et al., 2023; MadryLab's ``diffusion_trak`` scoring output, also D-TRAK's baseline),
each chosen step s contributes the diffusion loss of the clean image the model predicted *at that
step*, re-noised to the step's level with fresh keyed noise:

    x̂₀⁽ˢ⁾ = clip((x_{t_s} − √(1−ᾱ_{t_s}) ε_θ(x_{t_s}, t_s)) / √ᾱ_{t_s}, −1, 1)  (x₀-prediction)
    ε_s   ~ N(0, I) keyed by (JOURNEY_KEY, noise seed, the target's generation seed, t_s)
    g_s   = ∇_θ f(ε_θ(√ᾱ_{t_s} x̂₀⁽ˢ⁾ + √(1−ᾱ_{t_s}) ε_s, t_s), ε_s, ᾱ_{t_s})
            (f = the store's measure, TRAK's loss ‖ε_θ − ε_s‖²/d)
    φ_J(x) = Pᵀ (1/|S|) Σ_s g_s / ‖g_s‖     (normalised per step if the settings say so)

with the train features' parameter selection and projection P, so φ_J(x) lives in the space of
TRAK's Φ and τ(x, zᵢ) = φ_J(x)ᵀ(ΦᵀΦ + λI)⁻¹φᵢ. (The alternative of taking the loss at x_{t_s}
itself with the noise implied by x_{t_s} and the final image degenerates: at DDIM's last step
that implied noise *is* ε_θ(x_{t_s}), so the loss and its gradient vanish.)

Before any feature is taken the trajectory is regenerated from the recorded seeds with the
recorded sampler and step count, and the regenerated images must equal the recorded ones bit
for bit; otherwise the model, the schedule or the samples differ from those that made the
target, and a :class:`DiffattrError` says so.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.attribution.features.featurize import FeatureSettings, featurize
from diffattr.attribution.inputs import require_inputs
from diffattr.diffusion.sampling import Samples, sample
from diffattr.diffusion.schedule import NoiseSchedule, keyed_noise
from diffattr.errors import ConfigError, DataError, DiffattrError

#: Key namespace of the fresh noise re-noising each step's x₀-prediction.
JOURNEY_KEY = 0x4A524E59


def check_generated(targets: Any) -> Samples:
    """``targets`` as generated Samples with recorded seeds, else a :class:`DataError`."""
    seeds = getattr(targets, "seeds", None)
    images = getattr(targets, "images", None)
    if seeds is None or images is None or not hasattr(targets, "num_steps"):
        kind = type(targets).__name__
        raise DataError(
            f"journey-trak attributes along a generated image's own sampling trajectory; the "
            f"targets ({kind}) carry no recorded seeds",
            hint="use generated Samples (`diffattr generate`, or sample(...)) as targets; "
            "real images have no trajectory",
        )
    seeds = np.asarray(seeds)
    if seeds.size != images.shape[0] or (seeds < 0).any():
        raise DataError(
            "journey-trak: some targets have no recorded seed (seed < 0 marks a real image)",
            hint="attribute only generated targets with journey-trak",
        )
    return targets


def _with_attention(model: torch.nn.Module, classic: bool) -> torch.nn.Module:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    m = copy.deepcopy(model).eval()
    for module in m.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor() if classic else AttnProcessor2_0())
    return m


def regenerate(
    model: torch.nn.Module,
    samples: Samples,
    schedule: NoiseSchedule | None = None,
    batch_size: int = 64,
) -> Samples:
    """Regenerate ``samples`` with their trajectory; check the images are bit-identical.

    Tries the default (SDPA) attention that generation uses, then the classic processor that
    featurization switches models to; raises :class:`DiffattrError` if neither reproduces.
    Images are bit-identical only for the same batch composition: the same seeds list, cut into
    batches of ``batch_size`` (``sample``'s default, 64) as when they were generated.
    """
    samples = check_generated(samples)
    schedule = schedule or NoiseSchedule()
    if next(model.parameters()).device.type != "cpu":  # targets are generated on CPU: redo there
        model = copy.deepcopy(model).cpu()
    worst = 0.0
    for classic in (False, True):
        regen = sample(
            _with_attention(model, classic),
            samples.seeds,
            schedule,
            sampler=samples.sampler,
            num_steps=samples.num_steps,
            batch_size=batch_size,
            record_trajectory=True,
            progress=False,
        )
        if torch.equal(regen.images, samples.images.to(regen.images.dtype)):
            if samples.trajectory is not None and not torch.equal(
                regen.trajectory, samples.trajectory.to(regen.trajectory.dtype)
            ):
                continue
            return regen
        worst = float((regen.images - samples.images).abs().max())
    raise DiffattrError(
        f"regenerating the targets from their recorded seeds ({samples.sampler}, "
        f"{samples.num_steps} steps) does not reproduce them bit for bit (max |Δ| = {worst:.3g})",
        hint="attribute with the model and noise schedule that generated the targets, and all "
        "of the generated Samples (or the same generation batch size): a slice of them is "
        "regenerated in other batches, which changes the last bits",
    )


def trajectory_steps(num_recorded: int, steps: int | None) -> np.ndarray:
    """Indices of the recorded steps used: all, or ``steps`` evenly spaced (first and last)."""
    if steps is None or steps >= num_recorded:
        return np.arange(num_recorded, dtype=np.int64)
    if steps < 1:
        raise ConfigError(f"journey-trak steps must be >= 1, got {steps}")
    return np.unique(np.round(np.linspace(0, num_recorded - 1, steps)).astype(np.int64))


def _fingerprint(samples: Samples, target_ids: np.ndarray, chosen: np.ndarray) -> str:
    h = hashlib.sha256(b"diffattr-journey\0")
    h.update(np.ascontiguousarray(samples.images.numpy(), dtype="<f4").tobytes())
    for arr in (np.asarray(samples.seeds), np.asarray(target_ids), chosen):
        h.update(np.ascontiguousarray(arr, dtype="<i8").tobytes())
    h.update(f"{samples.sampler}:{samples.num_steps}".encode())
    return h.hexdigest()


class TrajectoryPairs:
    """Journey-TRAK's pairs (a :class:`~diffattr.attribution.features.pairs.PairSource`):
    for each chosen step s of a generated target's recorded trajectory, x̂₀⁽ˢ⁾ re-noised to
    t_s with noise keyed by (JOURNEY_KEY, noise seed, generation seed, t_s). The trajectory is
    regenerated (and checked bit for bit) on first use, so a complete store needs none."""

    def __init__(
        self,
        model: torch.nn.Module,
        samples: Samples,
        ids: np.ndarray,
        chosen: np.ndarray,
        schedule: NoiseSchedule,
        noise_seed: int,
        generation_batch_size: int | None = None,
    ) -> None:
        self.model, self.samples, self.schedule = model, samples, schedule
        self.chosen, self.noise_seed = chosen, noise_seed
        self.num = int(chosen.size)
        self.position = {int(i): j for j, i in enumerate(ids)}
        self.seeds = np.asarray(samples.seeds, dtype=np.int64)
        self.batch_size = generation_batch_size or samples.batch_size
        self.alphas = schedule.alphas_cumprod()
        self._trajectory: torch.Tensor | None = None
        self._step_of: dict[int, int] = {}

    def _regenerated(self) -> torch.Tensor:
        if self._trajectory is None:  # raises DiffattrError unless bit-identical
            regen = regenerate(self.model, self.samples, self.schedule, self.batch_size)
            ts = np.asarray(regen.timesteps, dtype=np.int64)[self.chosen]
            if np.unique(ts).size != ts.size:
                raise DiffattrError("journey-trak: the chosen steps repeat a timestep")
            self._step_of = {int(t): int(s) for t, s in zip(ts, self.chosen, strict=True)}
            self._trajectory = regen.trajectory
        return self._trajectory

    def timesteps_of(self, sample_id: int) -> np.ndarray:
        self._regenerated()
        return np.asarray(list(self._step_of), dtype=np.int64)

    def inputs(self, x0, ids, rows, ts, device) -> tuple[torch.Tensor, ...]:
        traj = self._regenerated()
        targets = [self.position[int(ids[r])] for r in rows]
        steps = torch.as_tensor([self._step_of[int(t)] for t in ts])
        xt = traj[steps, torch.as_tensor(targets)].to(device)
        t = torch.as_tensor(ts).to(device)
        a = self.alphas[t.cpu()].to(device)
        x0_hat = predicted_x0(self.model, xt, t, a.view(-1, *([1] * (xt.dim() - 1))))
        shape = tuple(xt.shape[1:])
        noise = torch.stack([
            keyed_noise(JOURNEY_KEY, self.noise_seed, int(self.seeds[j]), int(tt), shape)
            for j, tt in zip(targets, ts, strict=True)
        ]).to(device)  # fmt: skip
        x_noisy = self.schedule.add_noise(x0_hat, noise, t)
        target = self.schedule.target(x0_hat, noise, t)
        return torch.tensor(rows), x_noisy, t, target, a

    def describe(self) -> dict[str, Any]:
        return {"journey": {
            "definition": "renoised x0-prediction per step (JOURNEY_KEY noise), v1",
            "sampler": self.samples.sampler,
            "num_steps": int(self.samples.num_steps),
            "steps": self.chosen.tolist(),
            "seeds": self.seeds.tolist(),
        }}  # fmt: skip


def journey_features(
    model: torch.nn.Module,
    samples: Samples,
    settings: FeatureSettings,
    schedule: NoiseSchedule | None = None,
    store_dir: str | Path | None = None,
    target_ids: np.ndarray | None = None,
    steps: int | None = None,
    generation_batch_size: int | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """(T, k) Journey-TRAK features of generated ``samples`` (module docstring): the featurize
    pipeline over :class:`TrajectoryPairs`, stored in ``store_dir/journey-…`` when given
    (resumable; keyed by images, seeds and steps), else in a temporary store."""
    samples = check_generated(samples)
    if settings.projector == "auto":
        raise ConfigError("resolve the 'auto' projector (FeatureSettings.resolved) first")
    schedule = schedule or NoiseSchedule()
    n = len(samples)
    target_ids = np.arange(n) if target_ids is None else np.asarray(target_ids, dtype=np.int64)
    num_recorded = samples.num_steps if samples.trajectory is None else samples.trajectory.shape[0]
    chosen = trajectory_steps(num_recorded, steps)
    pairs = TrajectoryPairs(
        model, samples, target_ids, chosen, schedule, settings.noise_seed, generation_batch_size
    )
    fp = _fingerprint(samples, target_ids, chosen)
    with contextlib.ExitStack() as stack:
        if store_dir is None:
            store_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="diffattr-jt-"))
        store = featurize(
            model, samples.images, target_ids,
            Path(store_dir) / f"journey-{settings.measure}-{settings.key()}-{fp[:10]}", settings,
            schedule, fp, device=device, progress=progress, desc="featurize journey",
            pairs=pairs,
        )  # fmt: skip
        return np.asarray(store.features, dtype=np.float32)


@torch.no_grad()
def predicted_x0(
    model: torch.nn.Module, xt: torch.Tensor, t: torch.Tensor, a: torch.Tensor
) -> torch.Tensor:
    """The sampler's x₀-prediction at (x_t, t): clip((x_t − √(1−ᾱ) ε_θ) / √ᾱ, −1, 1)."""
    eps = model(xt, t).sample
    return ((xt - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)


def journey_from_inputs(
    inputs: Any, steps: int | None = None, generation_batch_size: int | None = None
) -> tuple[np.ndarray, dict]:
    """The registered ``journey-trak`` method's target features from its ScoreInputs."""
    samples = check_generated(inputs.targets)
    require_inputs(inputs, "journey-trak", "model", "settings")
    features = journey_features(
        inputs.context.model,
        samples,
        inputs.context.settings,
        inputs.context.schedule,
        inputs.context.store_dir,
        target_ids=inputs.target_ids,
        steps=steps,
        generation_batch_size=generation_batch_size,
        device=inputs.context.device,
        progress=inputs.context.progress,
    )
    num = samples.num_steps if samples.trajectory is None else samples.trajectory.shape[0]
    meta = {"journey_steps": trajectory_steps(num, steps).tolist(), "sampler": samples.sampler}
    return features, meta


def journey_inner_products(inputs: Any, options: dict[str, Any]) -> np.ndarray:
    """(T, N) φ(x)ᵀΦᵀ of ``journey-trak`` on targets given as images with ``target_seeds``.

    Generated targets (seed ≥ 0; the whole set regenerated as ``sample(model, seeds)`` made it,
    DDIM 50 steps unless the ``sampler`` / ``num_steps`` options say otherwise) get trajectory
    features against the training features Φ (``train_features``); real targets (seed < 0)
    have no trajectory and keep TRAK's own ``target_inner``, so journey-trak equals TRAK on
    them.
    """
    from diffattr.attribution.kernel import inner_products
    from diffattr.diffusion.sampling import initial_noise

    images = inputs.target_images
    num = images.shape[0]
    seeds = np.full(num, -1) if inputs.target_seeds is None else np.asarray(inputs.target_seeds)
    gen, real = np.flatnonzero(seeds >= 0), np.flatnonzero(seeds < 0)
    inner = np.zeros((num, inputs.num_train))
    if gen.size:
        require_inputs(inputs, "journey-trak", "model", "settings", "train_features")
        samples = Samples(
            images=images[torch.as_tensor(gen)],
            seeds=seeds[gen],
            initial_noise=initial_noise(seeds[gen], tuple(images.shape[1:])),
            sampler=options.get("sampler", "ddim"),
            num_steps=int(options.get("num_steps", 50)),
            timesteps=np.empty(0, dtype=np.int64),
        )
        ctx = inputs.context
        feats = journey_features(
            ctx.model, samples, ctx.settings, ctx.schedule, ctx.store_dir,
            target_ids=np.asarray(inputs.target_ids)[gen], steps=options.get("steps"),
            generation_batch_size=options.get("generation_batch_size"),
            progress=ctx.progress, device=ctx.device,
        )  # fmt: skip
        inner[gen] = inner_products(feats, inputs.features.train)
    if real.size:
        require_inputs(inputs, "journey-trak", "target_inner")  # TRAK's, for real targets
        inner[real] = np.asarray(inputs.features.target_inner, dtype=np.float64)[real]
    return inner
