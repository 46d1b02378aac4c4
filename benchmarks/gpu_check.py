"""GPU check: featurize throughput, projection speed and GPU/CPU agreement (run by gpu_check.sh).

    python benchmarks/gpu_check.py [--out DIR] [--device cuda] [--quick]

1. Featurize throughput on the ``cifar`` preset (35.7M parameters, 3×32×32, randomly initialised
   with a fixed seed — speed does not depend on the weights): ``featurize`` into a temporary
   feature store (gradients of the DAS output over K timesteps, countsketch to k), fp32 and
   bf16 gradients; per-sample gradients per second = samples × K / seconds, after a warm-up.
2. Projection speed of (B, p) float32 gradients already on the device: countsketch, sparse-jl,
   rademacher (dense, generated on the device in chunks) and, when its extension is installed,
   traker's CUDA projector (``trak-cuda``).
3. Agreement: the same few samples featurized on the device and on CPU (fp32, unprojected
   gradients and countsketch features); max over samples of ‖φ_dev − φ_cpu‖ / ‖φ_cpu‖, and
   bf16 on the device against fp32 on CPU.

Writes ``gpu_check.md`` (a markdown table) into --out and prints it.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffattr.attribution.features.featurize import FeatureSettings, featurize
from diffattr.attribution.features.gradients import resolve_device
from diffattr.attribution.features.projection import make_projector, trak_cuda_available
from diffattr.attribution.features.store import FeatureStore
from diffattr.diffusion.presets import build_unet
from diffattr.diffusion.schedule import NoiseSchedule


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def model_and_images(preset: str, size: int, n: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = build_unet(preset, size, 3).eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.rand(n, 3, size, size, generator=g) * 2 - 1


def featurize_once(model, images, settings, device, batch_size, root: Path) -> tuple[float, Path]:
    """Seconds to featurize ``images`` into a fresh store under ``root``; the store's path."""
    store_dir = Path(tempfile.mkdtemp(dir=root)) / "store"
    sync(device)
    t0 = time.perf_counter()
    featurize(
        model, images, np.arange(len(images)), store_dir, settings, NoiseSchedule(), "gpu-check",
        batch_size=batch_size, device=device, progress=False,
    )  # fmt: skip
    sync(device)
    return time.perf_counter() - t0, store_dir


def throughput(args, root: Path) -> list[tuple[str, str]]:
    model, images = model_and_images("cifar", 32, args.samples)
    params = sum(p.numel() for p in model.parameters())
    rows = [("cifar preset parameters", f"{params / 1e6:.1f}M")]
    for dtype in ("fp32", "bf16"):
        settings = FeatureSettings(
            timesteps=args.timesteps, projector="countsketch", proj_dim=args.proj_dim,
            grad_dtype=dtype,
        )  # fmt: skip
        featurize_once(model, images[: args.batch], settings, args.device, args.batch, root)
        small, _ = featurize_once(
            model, images[: args.batch], settings, args.device, args.batch, root
        )
        seconds, _ = featurize_once(model, images, settings, args.device, args.batch, root)
        rate = args.samples * args.timesteps / seconds
        # without the fixed cost of a call (projector tables, store creation)
        marginal = (args.samples - args.batch) * args.timesteps / max(seconds - small, 1e-9)
        rows.append(
            (
                f"featurize cifar, {dtype} gradients (N={args.samples}, K={args.timesteps}, "
                f"countsketch k={args.proj_dim}, batch {args.batch})",
                f"{rate:,.1f} per-sample gradients/s end to end ({seconds:.1f} s); "
                f"{marginal:,.1f}/s beyond the first batch",
            )
        )
    return rows


def projection(args) -> list[tuple[str, str]]:
    p, b, k = args.proj_input, args.proj_batch, args.proj_dim
    g = torch.randn(b, p, device=args.device)
    kinds = ["countsketch", "sparse-jl", "rademacher"]
    if trak_cuda_available(args.device):
        kinds.append("trak-cuda")
    rows = []
    for kind in kinds:
        proj = make_projector(kind, p, k, seed=0, device=args.device)
        proj.project(g)  # warm-up: tables, kernels
        sync(args.device)
        reps, t0 = 0, time.perf_counter()
        while reps < 3 or (time.perf_counter() - t0 < 2.0 and reps < 50):
            proj.project(g)
            sync(args.device)
            reps += 1
        seconds = (time.perf_counter() - t0) / reps
        rows.append(
            (
                f"project {b} × {p / 1e6:.1f}M → k={k}, {kind}",
                f"{b / seconds:,.0f} gradients/s ({seconds * 1e3:.1f} ms per batch)",
            )
        )
    if "trak-cuda" not in kinds:
        rows.append(("traker CUDA projector (fast_jl)", "not installed: skipped"))
    return rows


def agreement(args, root: Path) -> list[tuple[str, str]]:
    model, images = model_and_images("cifar", 32, args.agree_samples)
    rows = []
    for projector, dim in (("identity", None), ("countsketch", args.proj_dim)):
        settings = FeatureSettings(timesteps=2, projector=projector, proj_dim=dim)
        feats = {}
        for device, dtype in (("cpu", "fp32"), (args.device, "fp32"), (args.device, "bf16")):
            s = FeatureSettings(**{**settings.to_dict(), "grad_dtype": dtype})
            _, path = featurize_once(model, images, s, device, len(images), root)
            feats[(device, dtype)] = np.asarray(FeatureStore.load(path).features, np.float64)
        ref = feats[("cpu", "fp32")]
        for key in ((args.device, "fp32"), (args.device, "bf16")):
            rel = np.linalg.norm(feats[key] - ref, axis=1) / np.linalg.norm(ref, axis=1)
            what = "unprojected gradients" if projector == "identity" else f"countsketch k={dim}"
            rows.append(
                (
                    f"{key[0]} {key[1]} vs cpu fp32, {what} ({len(images)} samples, K=2)",
                    f"max relative difference {rel.max():.2e}",
                )
            )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, any device)")
    args = ap.parse_args()
    args.device = resolve_device(args.device)
    if args.quick:
        args.samples, args.batch, args.timesteps, args.proj_dim = 4, 2, 1, 512
        args.proj_input, args.proj_batch, args.agree_samples = 200_000, 4, 1
    else:
        args.samples, args.batch, args.timesteps, args.proj_dim = 256, 32, 4, 4096
        args.proj_input, args.proj_batch, args.agree_samples = 35_700_000, 32, 3
    header = [
        ("device", torch.cuda.get_device_name(args.device) if "cuda" in args.device else "cpu"),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"),
        ("python", platform.python_version()),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.time()
        rows = header + throughput(args, root)
        print(f"throughput done ({time.time() - t0:.0f} s)", file=sys.stderr)
        rows += projection(args)
        print(f"projection done ({time.time() - t0:.0f} s)", file=sys.stderr)
        rows += agreement(args, root)
        print(f"agreement done ({time.time() - t0:.0f} s)", file=sys.stderr)
    table = "| measurement | result |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(f"# GPU check\n\n`benchmarks/gpu_check.sh`\n\n{table}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
