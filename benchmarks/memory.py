"""Peak memory at full size: featurize the 35.7M-parameter `cifar` UNet at k = 32768, and score
N = 50,000 training rows × 1,000 targets from the memory-mapped store.

    .venv/bin/python benchmarks/memory.py [--quick] [--out benchmarks/results/memory.md]

Each case runs in a fresh child process and reports its own peak resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``, which counts mapped file pages too), its wall time and
what it computed:

- ``model``: the `cifar` preset built and one forward pass — the floor every featurize run pays.
- ``featurize <projector>``: :func:`diffattr.attribution.features.featurize.featurize` of synthetic
  32×32×3 images (the real code path: keyed noise, per-sample gradients of the DAS measure by
  the default strategy, projection, crash-safe store writes) with the sparse projectors at k =
  32768. The dense Gaussian/Rademacher projectors never hold the p×k matrix either (they
  generate it in chunks), but at p = 35.7M and k = 32768 each batch would generate 1.2·10¹²
  entries, which is not a CPU workload; they are measured at k = 256 on one batch of 4 images
  (each batch regenerates the 35.7M × 256 matrix chunk by chunk) to show their memory stays
  bounded. ``featurize-logra``: the per-layer projection at rank 16 (k = 32,147), which never
  forms a per-sample gradient.
- ``write store``: a FeatureStore of N × k synthetic float32 features written row-tile by
  row-tile (N = 50,000, k = 32768: 6.6 GB on disk).
- ``score``: the primal kernel G = ΦᵀΦ + λI accumulated from store tiles by BLAS syrk (float32
  above 2 GiB, factorised in place), then φ(x)ᵀG⁻¹Φᵀ for 1,000 target rows, streamed over the
  store. What stays resident: G (k² × 4 bytes = 4.3 GB at k = 32768), one tile, the target
  block and the (T, N) scores. Then the same kernel answers ``--queries`` single targets as an
  index does (the store kept mapped between them, after one warm-up query): the part of a
  query that is not featurizing its image (``featurize-query`` times that part).
- ``score-general``: the same with the Gram accumulated by a general product (gemm, c += AᵀA
  in place) instead of syrk — the baseline for syrk's half arithmetic, in the same run.
- ``featurize-query``: one image of the `cifar` preset featurized at K = 32 with the sketch
  projector (countsketch, the default) at k = 32768: what one query of an N = 50,000 index of
  that model featurizes.

``--quick`` runs small sizes (about a minute) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {
    "full": {
        "images": 16,
        "timesteps": 2,
        "k": 32768,
        "dense_k": 256,
        "n": 50_000,
        "t": 1000,
        "queries": 3,
        "query_timesteps": 32,
    },
    "quick": {
        "images": 4,
        "timesteps": 1,
        "k": 4096,
        "dense_k": 256,
        "n": 5_000,
        "t": 100,
        "queries": 3,
        "query_timesteps": 2,
    },
}


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def case_model(size: dict, work: Path) -> dict:
    import torch

    from diffattr.diffusion.presets import build_unet

    model = build_unet("cifar", 32, 3)
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32), torch.tensor([10])).sample.sum()
    params = sum(p.numel() for p in model.parameters())
    return {"detail": f"{params:,} parameters"}


def case_featurize(size: dict, work: Path, projector: str, k: int) -> dict:
    import torch

    from diffattr.attribution.features.featurize import FeatureSettings, featurize
    from diffattr.diffusion.presets import build_unet
    from diffattr.diffusion.schedule import NoiseSchedule

    model = build_unet("cifar", 32, 3)
    n = size["images"] if projector not in ("gaussian", "rademacher") else 4
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    settings = FeatureSettings(
        measure="das", timesteps=size["timesteps"], projector=projector, proj_dim=k
    )
    start = time.perf_counter()
    store = featurize(
        model, images, np.arange(n), work / f"store-{projector}", settings, NoiseSchedule(),
        data_fingerprint="synthetic", progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert store.is_complete()
    pairs = n * size["timesteps"]
    what = f"r={k} (k={store.dim})" if projector == "logra" else f"k={k}"
    return {
        "detail": f"{n} images × {size['timesteps']} timesteps (default batch sizes), "
        f"{projector} {what}",
        "seconds": seconds,
        "rate": f"{pairs / seconds:.2f} grads/s",
    }


def _store_settings(n: int, k: int) -> dict:
    return {"synthetic": True, "num_rows": n, "dim": k}


def case_write_store(size: dict, work: Path) -> dict:
    from diffattr.attribution.features.store import FeatureStore

    n, k = size["n"], size["k"]
    store = FeatureStore.open(work / "big-store", _store_settings(n, k), n, k)
    rng = np.random.default_rng(0)
    rows_per_tile = max(1, (64 << 20) // (4 * k))
    start = time.perf_counter()
    for s in range(0, n, rows_per_tile):
        rows = np.arange(s, min(n, s + rows_per_tile))
        store.write_rows(rows, rng.standard_normal((rows.size, k), dtype=np.float32))
    seconds = time.perf_counter() - start
    gb = n * k * 4 / 1e9
    return {"detail": f"N={n:,} × k={k:,} float32 ({gb:.1f} GB on disk)", "seconds": seconds}


def general_gram(features: np.ndarray, block=None, dtype=np.float64) -> np.ndarray:
    """ΦᵀΦ by a general product accumulated in place (BLAS gemm, c += fᵀf per tile): the
    baseline that :func:`diffattr.attribution.kernel.primal_gram`'s syrk halves."""
    import scipy.linalg.blas

    from diffattr.attribution.kernel import read_tiles

    k = features.shape[1]
    gram = np.zeros((k, k), dtype=dtype)
    c = gram.T  # Fortran-ordered view, updated in place
    gemm = scipy.linalg.blas.get_blas_funcs("gemm", dtype=gram.dtype)
    for _, f in read_tiles(features, block, dtype):
        out = gemm(1.0, f, f, beta=1.0, c=c, trans_a=1, overwrite_c=1)
        if not np.shares_memory(out, gram):
            c[...] = out
    return gram


def case_score(size: dict, work: Path, gram: str = "syrk") -> dict:
    import diffattr.attribution.kernel as kernel_module
    from diffattr.attribution.features.store import FeatureStore
    from diffattr.attribution.kernel import Kernel

    if gram == "general":
        kernel_module.primal_gram = general_gram
    n, k, t = size["n"], size["k"], size["t"]
    store = FeatureStore.load(work / "big-store")
    rng = np.random.default_rng(1)
    targets = rng.standard_normal((t, k), dtype=np.float32)
    start = time.perf_counter()
    kernel = Kernel.fit(store.features)
    fitted = time.perf_counter() - start
    scores = kernel.cross(targets)
    seconds = time.perf_counter() - start
    assert scores.shape == (t, n) and np.isfinite(scores).all()
    kernel.keep_mapped = True  # as an index's kernel
    one = rng.standard_normal((size["queries"] + 1, 1, k), dtype=np.float32)
    query = []
    for q in one:
        q0 = time.perf_counter()
        kernel.cross(q)
        query.append(time.perf_counter() - q0)
    rest = float(np.median(query[1:]))
    return {
        "detail": f"{t:,} targets × N={n:,}, k={k:,}, {kernel.form} kernel in {kernel.dtype}, "
        f"Gram by {gram}",
        "seconds": seconds,
        "rate": f"kernel {fitted:.0f} s (Gram by {gram}), products {seconds - fitted:.0f} s; "
        f"one-target query {rest:.2f} s (median of {len(query) - 1}, after one warm-up)",
        "kernel_seconds": fitted,
        "query_seconds": rest,
    }


def case_featurize_query(size: dict, work: Path) -> dict:
    import torch

    from diffattr.attribution.features.featurize import (
        DEFAULT_PROJECTION,
        FeatureSettings,
        featurize,
    )
    from diffattr.diffusion.presets import build_unet
    from diffattr.diffusion.schedule import NoiseSchedule

    model = build_unet("cifar", 32, 3)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    projector = DEFAULT_PROJECTION[0]  # what "auto" picks for N = 50,000 of this model
    settings = FeatureSettings(
        measure="das", timesteps=size["query_timesteps"], projector=projector, proj_dim=size["k"]
    )
    start = time.perf_counter()
    featurize(model, image, np.arange(1), work / "store-query", settings, NoiseSchedule(),
              data_fingerprint="synthetic", progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    return {
        "detail": f"1 image × {size['query_timesteps']} timesteps, {projector} k={size['k']}",
        "seconds": seconds,
        "rate": "the featurizing part of one query",
    }


def child(case: str, mode: str, work: Path) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    size = SIZES[mode]
    if case == "model":
        out = case_model(size, work)
    elif case == "featurize-query":
        out = case_featurize_query(size, work)
    elif case.startswith("featurize-"):
        projector = case.split("-", 1)[1]
        k = size["dense_k"] if projector in ("gaussian", "rademacher") else size["k"]
        k = LOGRA_RANK if projector == "logra" else k
        out = case_featurize(size, work, projector, k)
    elif case == "write-store":
        out = case_write_store(size, work)
    elif case == "score":
        out = case_score(size, work)
    elif case == "score-general":
        out = case_score(size, work, gram="general")
    else:
        raise SystemExit(f"unknown case {case}")
    out["peak_rss"] = peak_rss()
    print("RESULT " + json.dumps(out), flush=True)


CASES = ["model", "featurize-countsketch", "featurize-sparse-jl", "featurize-rademacher",
         "featurize-logra", "write-store", "score", "score-general",
         "featurize-query"]  # fmt: skip
#: ``featurize-logra``: the per-layer rank (16 gives k = 32,147 on the `cifar` preset).
LOGRA_RANK = 16


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/memory.md"))
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: tmp)")
    p.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated subset of: {', '.join(CASES)} (the score cases need write-store)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full"
    if args.child:
        child(args.child, mode, args.work)
        return 0
    work = Path(tempfile.mkdtemp(prefix="diffattr-memory-", dir=args.work))
    rows, began = [], time.perf_counter()
    try:
        chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = sorted(set(chosen) - set(CASES))
        if unknown:
            raise SystemExit(f"unknown case(s): {', '.join(unknown)}")
        for case in chosen:
            cmd = [sys.executable, __file__, "--child", case, "--work", str(work)]
            cmd += ["--quick"] if args.quick else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.stderr.write(proc.stderr[-3000:])
                raise SystemExit(f"case {case} failed (exit {proc.returncode})")
            res = json.loads(line[-1][len("RESULT ") :])
            rows.append({"case": case, **res})
            print(f"{case}: peak RSS {res['peak_rss'] / 2**30:.2f} GiB, {res.get('detail', '')}",
                  flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - began
    head = [
        f"Command: `{shlex.join(['.venv/bin/python', 'benchmarks/memory.py', *(argv or sys.argv[1:])])}`",  # noqa: E501
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; "
        f"mode {mode}; total wall time {total:.0f} s.",
        "",
        "| case | what | peak RSS (GiB) | wall s | notes |",
        "|---|---|---|---|---|",
    ]
    body = [
        f"| {r['case']} | {r.get('detail', '')} | {r['peak_rss'] / 2**30:.2f} | "
        f"{r.get('seconds', float('nan')):.1f} | {r.get('rate', '')} |"
        for r in rows
    ]
    text = "\n".join(head + body) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
