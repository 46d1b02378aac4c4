"""Query latency of an attribution index (issue 30): one image at a time, split into
featurizing the image and everything else, with the index's build time and peak memory.

    .venv/bin/python benchmarks/query.py [--run runs/query-digits] [--train-count 1000] \
        [--queries 5] [--out benchmarks/results/query.md]

Trains (once) a `tiny` digits run on ``--train-count`` images (800 steps: latency does not
depend on how well the model is trained), then, in a fresh child process each, builds the
index of the default method (DAS, K = 32: the training features, the kernel's factor, κ's
held-out reference; the training features are computed by the build when missing) and
answers ``--queries`` single held-out images through ``AttributionIndex.score`` — timing the
target featurization inside each query (``Attributor.featurize_targets``) apart from the
rest (the kernel solve and the products over the training store, confidence, names). Each
process reports its own peak resident set size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def child_build(run: str) -> dict:
    from diffattr.families import open_run

    bound = open_run(run)
    had_features = any(bound.run.features_dir.glob("train-das-*/features.npy"))
    bound.index("das", progress=False).remove()  # time a build, not a load
    start = time.perf_counter()
    index = bound.index("das", progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "index": str(index.path), "had_features": had_features}


def child_query(run: str, queries: int) -> dict:
    from diffattr.families import open_run

    bound = open_run(run)
    index = bound.index("das", build=False, progress=False)
    att = index.attributor
    _, val = bound.run.data_spec().load()
    featurize = att.featurize_targets
    spent: list[float] = []

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = featurize(*args, **kwargs)
        spent.append(time.perf_counter() - t0)
        return out

    att.featurize_targets = timed

    def timed_queries() -> dict:
        index.score(val.subset(np.arange(1)))  # warm: the training store's pages, the model
        spent.clear()
        totals = []
        for q in range(1, queries + 1):
            one = val.subset(np.arange(q, q + 1))
            t0 = time.perf_counter()
            index.score(one)
            totals.append(time.perf_counter() - t0)
        feat, total = np.asarray(spent), np.asarray(totals)
        return {
            "total": float(np.median(total)),
            "featurize": float(np.median(feat)),
            "rest": float(np.median(total - feat)),
            "ratio": float(np.median(total / feat)),
        }

    out = {**timed_queries(), "num_train": len(bound.train_set)}
    # The same queries the way they were read before the store was kept mapped and few
    # targets' tiles were converted in blocks (each tile copied to float64, pages released).
    import diffattr.attribution.kernel as kernel_module

    kernel_module.FEW_TARGETS, att.kernel().keep_mapped = 0, False
    out["before"] = timed_queries()
    return out


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{args[:2]} failed (exit {proc.returncode})")
    return json.loads(line[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/query-digits")
    p.add_argument("--train-count", type=int, default=1000)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/query.md"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import torch

        out = (
            child_build(args.run) if args.child == "build" else child_query(args.run, args.queries)
        )
        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        out["threads"] = torch.get_num_threads()
        print("RESULT " + json.dumps(out), flush=True)
        return
    if not Path(args.run, "model", "config.json").is_file():
        from diffattr.cli import main as cli

        argv = ["train", "--data", "digits", "--train-count", str(args.train_count),
                "--val-count", "200", "--steps", "800", "--out", args.run, "--quiet"]  # fmt: skip
        assert cli(argv) == 0
    build = run_child("--child", "build", "--run", args.run)
    query = run_child("--child", "query", "--run", args.run, "--queries", str(args.queries))
    command = f".venv/bin/python benchmarks/query.py --run {args.run} --queries {args.queries}"
    text = (
        f"`{command}` (DAS, K = 32, default λ; N = {query['num_train']:,} digits 8×8; "
        f"{query['threads']} threads)\n\n"
        "| step | seconds (median of queries) | peak RSS (GiB) |\n|---|---|---|\n"
        f"| index build (kernel factor, κ reference"
        f"{'; training features already stored' if build['had_features'] else ', features'}) | "
        f"{build['seconds']:.2f} | "
        f"{build['peak_rss_gib']:.2f} |\n"
        f"| query: featurize the image | {query['featurize']:.3f} | |\n"
        f"| query: everything else | {query['rest']:.3f} | |\n"
        f"| query: total | {query['total']:.3f} | {query['peak_rss_gib']:.2f} |\n"
        f"| before (store tiles copied to float64, pages released): everything else | "
        f"{query['before']['rest']:.3f} | |\n\n"
        f"Whole query / featurizing alone: {query['ratio']:.2f}× (goal: at most 1.5×); "
        f"everything else {query['before']['rest'] / query['rest']:.2f}× faster than before, "
        "in the same process.\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
