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

import copy
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffattr.attribution.features.featurize import (
    FeatureSettings,
    build_projector,
    gradient_computer,
)
from diffattr.attribution.features.gradients import GradientComputer
from diffattr.attribution.features.store import FeatureStore
from diffattr.attribution.inputs import require_inputs
from diffattr.diffusion.presets import model_fingerprint
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


def journey_features(
    model: torch.nn.Module,
    samples: Samples,
    settings: FeatureSettings,
    schedule: NoiseSchedule | None = None,
    store_dir: str | Path | None = None,
    target_ids: np.ndarray | None = None,
    steps: int | None = None,
    generation_batch_size: int | None = None,
    micro_batch: int = 64,
    device: str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """(T, k) Journey-TRAK features of generated ``samples`` (module docstring), stored in
    ``store_dir/journey-…`` when given (resumable; keyed by images, seeds and steps)."""
    samples = check_generated(samples)
    if settings.projector == "auto":
        raise ConfigError("resolve the 'auto' projector (FeatureSettings.resolved) first")
    schedule = schedule or NoiseSchedule()
    n = len(samples)
    target_ids = np.arange(n) if target_ids is None else np.asarray(target_ids, dtype=np.int64)
    computer = gradient_computer(
        model, settings, schedule, tuple(samples.images.shape[1:]), device, micro_batch
    )
    measure = computer.measure
    micro_batch = computer.micro_batch  # capped by the model's size
    projector = build_projector(settings, computer.dim, device, computer)
    num_recorded = samples.num_steps if samples.trajectory is None else samples.trajectory.shape[0]
    chosen = trajectory_steps(num_recorded, steps)
    store = None
    rows = np.arange(n)
    if store_dir is not None:
        fp = _fingerprint(samples, target_ids, chosen)
        path = Path(store_dir) / f"journey-{settings.measure}-{settings.key()}-{fp[:10]}"
        store = FeatureStore.open(
            path,
            {
                "features": settings.to_dict(),
                "projector": projector.describe(),
                "measure": measure.describe(),
                "schedule": schedule.to_dict(),
                "model_fingerprint": model_fingerprint(model),
                "data_fingerprint": fp,
                "journey": {
                    "definition": "renoised x0-prediction per step (JOURNEY_KEY noise), v1",
                    "sampler": samples.sampler,
                    "num_steps": int(samples.num_steps),
                    "steps": chosen.tolist(),
                    "seeds": np.asarray(samples.seeds).tolist(),
                },
                "num_params": computer.num_params,
                "ids": target_ids.tolist(),
            },
            n,
            projector.output_dim,
        )
        rows = store.missing_rows()
        if rows.size == 0:
            return np.asarray(store.features, dtype=np.float32)
    regen = regenerate(  # raises DiffattrError unless bit-identical
        model, samples, schedule, generation_batch_size or samples.batch_size
    )
    traj, ts = regen.trajectory, np.asarray(regen.timesteps, dtype=np.int64)[chosen]
    seeds = np.asarray(samples.seeds, dtype=np.int64)
    alphas = schedule.alphas_cumprod()
    dev = computer.device
    shape = tuple(samples.images.shape[1:])
    out = np.zeros((n, projector.output_dim), dtype=np.float32)
    group = max(1, micro_batch // chosen.size)  # targets whose full gradients are held at once
    bar = tqdm(total=rows.size, desc="featurize journey", unit="img", disable=not progress)
    for g0 in range(0, rows.size, group):
        batch = rows[g0 : g0 + group]
        acc = torch.zeros(batch.size, computer.dim, dtype=torch.float32, device=dev)
        pairs = [(b, j) for b in range(batch.size) for j in range(chosen.size)]
        for s in range(0, len(pairs), micro_batch):
            chunk = pairs[s : s + micro_batch]
            local = torch.tensor([b for b, _ in chunk])
            r = torch.as_tensor(batch)[local]
            js = [j for _, j in chunk]
            xt = traj[torch.as_tensor(chosen[js]), r].to(dev)
            t = torch.as_tensor(ts[js]).to(dev)
            ab = alphas[t.cpu()].to(dev)
            a = ab.view(-1, *([1] * (xt.dim() - 1)))
            x0_hat = predicted_x0(computer, xt, t, a)
            noise = torch.stack(
                [
                    keyed_noise(JOURNEY_KEY, settings.noise_seed, int(seeds[i]), int(tt), shape)
                    for i, tt in zip(r.tolist(), t.tolist(), strict=True)
                ]
            ).to(dev)
            x_noisy = schedule.add_noise(x0_hat, noise, t)
            g, _, _ = computer.flat_grads(x_noisy, t, noise, ab)
            norms = g.norm(dim=1)
            if not torch.isfinite(norms).all():
                raise DiffattrError(
                    f"non-finite Journey-TRAK gradient for target {int(target_ids[r[0]])}",
                    hint="check the model checkpoint and the targets for NaN/Inf",
                )
            if settings.normalize:
                g = g / norms.clamp_min(1e-30)[:, None]
            acc.index_add_(0, local.to(dev), g)
        phi = projector.project(acc / chosen.size).cpu().numpy()
        if store is None:
            out[batch] = phi
        else:
            with store.lock():
                store.write_rows(batch, phi)
        bar.update(batch.size)
    bar.close()
    return out if store is None else np.asarray(store.features, dtype=np.float32)


@torch.no_grad()
def predicted_x0(
    computer: GradientComputer, xt: torch.Tensor, t: torch.Tensor, a: torch.Tensor
) -> torch.Tensor:
    """The sampler's x₀-prediction at (x_t, t): clip((x_t − √(1−ᾱ) ε_θ) / √ᾱ, −1, 1)."""
    eps = computer.model(xt, t).sample
    return ((xt - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)


def journey_from_inputs(
    inputs: Any, steps: int | None = None, generation_batch_size: int | None = None
) -> tuple[np.ndarray, dict]:
    """The registered ``journey-trak`` method's target features from its ScoreInputs."""
    samples = check_generated(inputs.targets)
    require_inputs(inputs, "journey-trak", "model", "settings")
    features = journey_features(
        inputs.model,
        samples,
        inputs.settings,
        inputs.schedule,
        inputs.store_dir,
        target_ids=inputs.target_ids,
        steps=steps,
        generation_batch_size=generation_batch_size,
        device=inputs.device,
        progress=inputs.progress,
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
        feats = journey_features(
            inputs.model, samples, inputs.settings, inputs.schedule, inputs.store_dir,
            target_ids=np.asarray(inputs.target_ids)[gen], steps=options.get("steps"),
            generation_batch_size=options.get("generation_batch_size"),
            progress=inputs.progress, device=inputs.device,
        )  # fmt: skip
        inner[gen] = inner_products(feats, inputs.train_features)
    if real.size:
        require_inputs(inputs, "journey-trak", "target_inner")  # TRAK's, for real targets
        inner[real] = np.asarray(inputs.target_inner, dtype=np.float64)[real]
    return inner
