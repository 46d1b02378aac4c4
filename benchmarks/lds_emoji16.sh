#!/usr/bin/env bash
# The colour LDS benchmark: emoji at 16×16 RGB (Noto Emoji, `diffattr data install emoji`),
# N = 1,000, the `small` UNet (2.7M parameters), 2,400 steps of batch 32, 20 half-subsets × 2
# seeds, 100 held-out real and 100 generated targets, F over 100 timesteps.
#
#   --rebuild   train the run (one thread, ≈ 13 min) and build the ground truth: 40 subset
#               models in 2 one-thread workers (≈ 13 min each, ≈ 4.5 h on 2 cores). Resumable:
#               each finished model's F.npy is committed (benchmarks/lds/emoji16/models/*/F.npy),
#               so a build interrupted in one session goes on in the next.
#   --build-only  stop after the build.
# Without options: the tables, from the committed ground truth and kernel caches.
set -euo pipefail
cd "$(dirname "$0")/.."
D=.venv/bin/diffattr
RUN=runs/lds-emoji16
BENCH=benchmarks/lds/emoji16

if [ "${1:-}" = "--rebuild" ]; then
  $D data install emoji
  [ -f $RUN/model/config.json ] || $D train --data emoji16 --train-count 1000 --val-count 200 \
    --preset small --steps 2400 --batch-size 32 --threads 1 --quiet --out $RUN
  $D lds build $RUN --out $BENCH --subsets 20 --seeds 0,1 --measure-timesteps 100 \
    --num-val 100 --num-gen 100 --executor local --workers 2
  shift
fi
[ "${1:-}" = "--build-only" ] && exit 0
RUNARG=""
[ -d $RUN/model ] && RUNARG="--run $RUN"

# First: today's defaults and best configurations, unchanged.
$D lds eval $BENCH $RUNARG --method das,dtrak,trak,pixel-cos,embedding-cos,random \
  --timesteps 10,32,100 --out $BENCH/results.md
