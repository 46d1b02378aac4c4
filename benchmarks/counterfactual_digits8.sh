#!/usr/bin/env bash
# The committed CPU counterfactual benchmark: digits 8×8, N = 500, tiny UNet, 1600 steps,
# batch 32 (the settings of runs/lds-digits8). For 12 generated targets, remove the target's
# top k = 25 training images (5%) by each removal rule — random, pixel-cos nearest (the
# baseline any attribution must beat), D-TRAK, D-TRAK screened, DAS, DAS screened (screen
# `pixel-cos:10%`: each target's scores kept on its M = 50 > k pixel-nearest training images,
# kernel on the union of the candidates, as `diffattr score --screen`) — retrain with the same
# seed and common random numbers, regenerate the target from its seed, measure the change.
# 12 × 6 removal sets + one k = 0 control = 73 retrainings (fewer where two rules remove the
# same 25 images for a target: they share one) in 2 one-thread workers (≈ 57 s each, like the
# LDS subset models) ≈ 35 min; with training, generation and featurization ≈ 40 min on 2 cores.
# Rerunning resumes: finished retrainings are not repeated (content-addressed by the removed
# ids under $OUT/retrain/), and the scores of dtrak and das are reused from $OUT/scores/, so
# a machine that still has runs/cf-digits8 from the former 37-retraining run (random, dtrak,
# das) adds only the pixel-cos and screened retrainings (≤ 36, ≈ 17 min). Across machines
# (runs/ is lost) the finished retrainings' small files are kept in the committed
# benchmarks/counterfactual/digits8/cache/ (benchmarks/counterfactual_cache.sh): saved when the
# script ends (or with --save-cache from another shell), restored when it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
D=.venv/bin/diffattr
RUN=runs/cf-digits8
OUT=$RUN/counterfactual            # holds the retrained models (runs/ is not committed)
RESULTS=benchmarks/counterfactual/digits8
CACHE=$RESULTS/cache               # committed: what a new machine needs to resume
# shellcheck source=benchmarks/counterfactual_cache.sh
NAME=counterfactual_digits8
source benchmarks/counterfactual_cache.sh
start_from_cache "$@"              # --save-cache: save and exit; else restore
trap 'save_cache' EXIT

# One thread, like each retraining in a worker: training is bit-reproducible only at the same
# thread count, so the k = 0 control then reproduces the run's model exactly (row `none` = 0).
$D train --data digits --train-count 500 --val-count 200 --steps 1600 --batch-size 32 \
  --out $RUN --threads 1 --quiet
[ -f $RUN/samples/samples.npz ] || $D generate $RUN --num 12 --quiet --threads 2
$D counterfactual $RUN --method pixel-cos,dtrak,das --screen pixel-cos:10% --k 25 \
  --num-targets 12 --picture-targets 8 --executor local --workers "${WORKERS:-2}" --out $OUT --threads 2

mkdir -p $RESULTS
cp $OUT/results.md $OUT/results.json $OUT/counterfactual.png $RESULTS/
