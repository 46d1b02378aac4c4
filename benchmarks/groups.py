"""Group attribution against leave-one-group-out retraining (issue 31; diffattr.evaluation.groups).

Build (resumable: each finished model keeps its F.npy, committed under OUT/models):

    .venv/bin/python benchmarks/groups.py build --run runs/lds-digits8 \
        --bench benchmarks/lds/digits8 --out benchmarks/groups/digits8 [--seeds 0,1] [--workers 1]

retrains the LDS benchmark's run without each group of its training set (the data's own labels:
digit classes, emoji categories; or --groups FILE) and once on everything, per seed, with the
run's training settings and common random numbers, and measures F on the benchmark's targets.

Evaluate (from the LDS benchmark's kernel caches; EK-FAC needs --run):

    .venv/bin/python benchmarks/groups.py eval --out benchmarks/groups/digits8 \
        --run runs/lds-digits8 --method das,dtrak,trak,ekfac,pixel-cos,random --timesteps 32

writes OUT/results.md and results.json: per method and target kind, the mean over targets of
the Spearman correlation over groups between the summed scores and the measured effects, and
the share of targets whose top group agrees, with bootstrap CIs over targets.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("stage", choices=["build", "eval"])
    p.add_argument("--run", default=None)
    p.add_argument("--bench", default="benchmarks/lds/digits8")
    p.add_argument("--out", default="benchmarks/groups/digits8")
    p.add_argument("--groups", default=None, help="a groups file (default: the data's labels)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--method", default="das,dtrak,trak,ekfac,pixel-cos,random")
    p.add_argument("--timesteps", type=int, default=32)
    args = p.parse_args()

    from diffattr.attribution.methods.spec import parse_method_list
    from diffattr.attribution.scores.names import Names
    from diffattr.commands.attribute import group_assignment
    from diffattr.evaluation.groups import (
        build_group_truth,
        evaluate_groups,
        format_group_table,
        write_rows,
    )
    from diffattr.fsio import read_json
    from diffattr.parallel import make_executor
    from diffattr.run import RunDir

    start = time.time()
    if args.stage == "build":
        run = RunDir(args.run)
        train_set, _ = run.data_spec().load()
        assignment = group_assignment(args.groups, Names.of(train_set))
        if not assignment:
            raise SystemExit("the training set has no labels: pass --groups FILE")
        seeds = [int(s) for s in args.seeds.split(",")]
        with make_executor("local", args.workers) as executor:
            build_group_truth(run, args.bench, args.out, assignment, seeds, executor)
        print(f"built in {time.time() - start:.0f} s")
        return
    run = RunDir(args.run) if args.run else None
    rows = evaluate_groups(args.out, run, parse_method_list(args.method), args.timesteps)
    groups = len(read_json(Path(args.out) / "groups.json")["groups"])
    table = format_group_table(rows, groups)
    command = "`.venv/bin/python benchmarks/groups.py eval " + " ".join(
        f"--{k} {v}" for k, v in (("out", args.out), ("run", args.run), ("method", args.method),
                                  ("timesteps", args.timesteps)) if v is not None
    ) + "`"  # fmt: skip
    text = f"{command} ({time.time() - start:.0f} s)\n\n{table}"
    Path(args.out, "results.md").write_text(text)
    write_rows(Path(args.out, "results.json"), rows)
    print(text)


if __name__ == "__main__":
    main()
