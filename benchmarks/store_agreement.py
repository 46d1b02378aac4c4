"""Feature stores written by this checkout and by another one (e.g. the code before a change)
agree: featurize the same digits with both and compare the rows.

    .venv/bin/python benchmarks/store_agreement.py --other-src ../other-checkout/src

Each setting featurizes the first N built-in digits (8×8) with a seeded random `tiny` UNet
through ``featurize`` (the same function ``diffattr featurize`` and ``lds eval`` call), once
in this process and once in a subprocess whose ``PYTHONPATH`` is ``--other-src``, and reports
max over rows of ‖φ_this − φ_other‖ / ‖φ_other‖ and of |Δerror| / |error|.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

#: (name, featurize settings, N images) checked by default.
SETTINGS = [
    ("das K=10 normalised, exact", {"measure": "das", "timesteps": 10}, 24),
    ("das K=100 normalised, exact", {"measure": "das", "timesteps": 100}, 6),
    ("loss K=4 unnormalised, exact", {"measure": "loss", "timesteps": 4, "normalize": False}, 24),
    ("dtrak K=10 normalised, logra r=16",
     {"measure": "dtrak", "timesteps": 10, "projector": "logra", "proj_dim": 16}, 24),
    ("das K=10 normalised, countsketch k=4096",
     {"measure": "das", "timesteps": 10, "projector": "countsketch", "proj_dim": 4096}, 24),
]  # fmt: skip
THREADS = 2


def featurize_digits(store: Path, settings: dict, n: int, batch_size: int = 32) -> float:
    """Featurize the first ``n`` digits into ``store`` with a seeded random `tiny` UNet;
    returns the wall time of the ``featurize`` call in seconds."""
    from diffattr.attribution.features.featurize import FeatureSettings, featurize
    from diffattr.data import load_builtin
    from diffattr.diffusion.presets import build_unet
    from diffattr.diffusion.schedule import NoiseSchedule

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1).eval()
    data = load_builtin("digits")
    images, ids = data.images[:n], np.asarray(data.ids[:n], dtype=np.int64)
    fs = FeatureSettings(**{"projector": "identity", **settings})
    start = time.perf_counter()
    featurize(model, images, ids, store, fs, NoiseSchedule(), f"digits-{n}", batch_size=batch_size,
              progress=False)  # fmt: skip
    return time.perf_counter() - start


def featurize_elsewhere(src: str, store: Path, settings: dict, n: int) -> float:
    """:func:`featurize_digits` in a subprocess importing diffattr from ``src``."""
    env = {**os.environ, "PYTHONPATH": src}
    cmd = [sys.executable, __file__, "--write", str(store), "--settings", json.dumps(settings),
           "-n", str(n)]  # fmt: skip
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["seconds"])


def compare(a: Path, b: Path) -> dict[str, float]:
    """max row ‖φ_a − φ_b‖/‖φ_b‖ and max |e_a − e_b|/|e_b| of two complete stores."""
    from diffattr.attribution.features.store import FeatureStore

    sa, sb = FeatureStore.load(a), FeatureStore.load(b)
    fa, fb = np.asarray(sa.features, np.float64), np.asarray(sb.features, np.float64)
    rel = np.linalg.norm(fa - fb, axis=1) / np.maximum(np.linalg.norm(fb, axis=1), 1e-30)
    ea, eb = sa.column("error").astype(np.float64), sb.column("error").astype(np.float64)
    return {"features": float(rel.max()),
            "error": float(np.max(np.abs(ea - eb) / np.maximum(np.abs(eb), 1e-30)))}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other-src", help="the other checkout's src directory")
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--settings", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("-n", type=int, default=24, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write is not None:  # the subprocess side
        sec = featurize_digits(args.write, json.loads(args.settings), args.n)
        print(json.dumps({"seconds": sec}))
        return 0
    if not args.other_src:
        parser.error("--other-src is required")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, settings, n) in enumerate(SETTINGS):
            here, there = Path(tmp) / f"here{i}", Path(tmp) / f"there{i}"
            t_here = featurize_digits(here, settings, n)
            t_there = featurize_elsewhere(args.other_src, there, settings, n)
            diff = compare(here, there)
            worst = max(worst, diff["features"])
            print(f"{name} (N={n}): max row rel. difference {diff['features']:.1e}, "
                  f"error {diff['error']:.1e}; {t_here:.1f} s here, {t_there:.1f} s there",
                  flush=True)  # fmt: skip
    print(f"worst feature difference: {worst:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
