"""Speed on a machine that is doing something else: training and featurize alone and beside a
busy process, under each thread count and OpenMP wait policy, in one run.

    .venv/bin/python benchmarks/shared_machine.py --out benchmarks/results/shared-machine.md

Work (each in a fresh subprocess, so that the OpenMP settings take effect at start):
- train: training steps of the ``tiny`` UNet on 8×8 digits, batch 32 (``diffattr.diffusion
  .training.train``), seconds per step from the difference of a 40- and a 10-step run;
- featurize: DAS features of 64 digits at K = 32 through ``featurize`` (the store writes
  included), pairs (sample × timestep) per second.
"Busy" is a second process doing float32 matmuls with torch's default threads (as another
PyTorch job would), started before and stopped after each measurement. Configurations:
torch's default threads (all cores) and 1 thread, each with OpenMP's default (spinning) and
passive wait policy; "diffattr" is what the CLI chooses by itself (``diffattr.threads``).
Each cell is the median of ``--repeats`` runs; the busy/alone ratio is the slowdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"
CONFIGS = {
    "torch default threads, spinning": {"threads": None, "policy": None},
    "torch default threads, passive": {"threads": None, "policy": "PASSIVE"},
    "1 thread, spinning": {"threads": 1, "policy": None},
    "1 thread, passive": {"threads": 1, "policy": "PASSIVE"},
    "diffattr's choice": {"threads": "auto", "policy": "auto"},
}


def worker(kind: str, threads: str | None) -> dict[str, float]:
    """Measure one work kind in this process (after the parent set the environment)."""
    if threads == "auto":
        from diffattr.threads import configure_threads

        configure_threads(None)
    else:
        import torch

        if threads is not None:
            torch.set_num_threads(int(threads))
    import torch

    from diffattr.data import load_builtin

    digits = load_builtin("digits")
    out: dict[str, float] = {"threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "train":
            from diffattr.diffusion.training import TrainConfig, train

            data = digits.subset(range(256))
            times = {}
            for steps in (10, 40):
                config = TrainConfig(steps=steps, batch_size=32, checkpoint_every=10**6)
                t0 = time.perf_counter()
                train(data, config, Path(tmp) / f"s{steps}", progress=False)
                times[steps] = time.perf_counter() - t0
            out["seconds_per_step"] = (times[40] - times[10]) / 30
        else:
            from diffattr.attribution.features.featurize import FeatureSettings, featurize
            from diffattr.diffusion.presets import build_unet
            from diffattr.diffusion.schedule import NoiseSchedule

            torch.manual_seed(0)
            model = build_unet("tiny", 8, 1)
            data = digits.subset(range(64))
            settings = FeatureSettings(measure="das", timesteps=32, projector="identity")
            featurize(model, data.images[:8], data.ids[:8].numpy(), Path(tmp) / "warm",
                      settings, NoiseSchedule(), "warm", progress=False)  # fmt: skip
            t0 = time.perf_counter()
            featurize(model, data.images, data.ids.numpy(), Path(tmp) / "store", settings,
                      NoiseSchedule(), "bench", progress=False)  # fmt: skip
            out["pairs_per_second"] = 64 * 32 / (time.perf_counter() - t0)
    return out


def measure(kind: str, config: dict, busy: bool) -> dict[str, float]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("DIFFATTR_OMP_WAIT_POLICY", None)
    if config["policy"] not in (None, "auto"):
        env["OMP_WAIT_POLICY"] = config["policy"]
    hog = None
    if busy:
        hog_env = dict(os.environ)
        hog_env.pop("OMP_WAIT_POLICY", None)
        hog = subprocess.Popen([sys.executable, "-c", BUSY], env=hog_env)
        time.sleep(1.0)  # let it spin up
    try:
        args = [sys.executable, __file__, "--worker", kind]
        if config["threads"] is not None:
            args += ["--threads", str(config["threads"])]
        res = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/shared-machine.md")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", choices=["train", "featurize"], default=None)
    p.add_argument("--threads", default=None)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads)))
        return
    t_start = time.time()
    rows = []
    for name, config in CONFIGS.items():
        cell: dict[str, dict[str, list[float]]] = {}
        for _ in range(args.repeats):  # alternate alone and busy so drift hits both
            for busy in (False, True):
                for kind, key in (("train", "seconds_per_step"), ("featurize", "pairs_per_second")):
                    r = measure(kind, config, busy)
                    cell.setdefault(kind, {}).setdefault(str(busy), []).append(r[key])
                    cell.setdefault("threads", {}).setdefault(f"{kind}{busy}", []).append(
                        r["threads"]
                    )
        med = {k: {b: statistics.median(v) for b, v in d.items()} for k, d in cell.items()}
        rows.append((name, med))
        print(name, json.dumps(med), flush=True)
    lines = [
        "# Speed on a shared machine",
        "",
        f"Command: `.venv/bin/python benchmarks/shared_machine.py --out {args.out}` "
        f"({time.time() - t_start:.0f} s). Machine: {platform.machine()}, {os.cpu_count()} "
        f"CPUs; median of {args.repeats} alternating runs. Busy = one other process doing "
        "float32 matmuls with torch's default threads.",
        "",
        "| configuration | threads alone / busy | train s/step alone | train s/step busy | "
        "train slowdown | featurize pairs/s alone | featurize pairs/s busy | featurize slowdown |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        tr, fe, th = m["train"], m["featurize"], m["threads"]
        lines.append(
            f"| {name} | {th['trainFalse']:.0f} / {th['trainTrue']:.0f} | "
            f"{tr['False']:.3f} | {tr['True']:.3f} | {tr['True'] / tr['False']:.2f}× | "
            f"{fe['False']:.0f} | {fe['True']:.0f} | {fe['False'] / fe['True']:.2f}× |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
