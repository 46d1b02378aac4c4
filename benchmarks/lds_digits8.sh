#!/usr/bin/env bash
# The committed CPU LDS benchmark: digits 8×8, N = 500, tiny UNet, 24 half-subsets × 2 seeds.
# Stage 1 (≈35 min on 2 cores) rebuilds the ground truth; stage 2 computes the kernels from the
# full model's features (≈15 min); with the committed kernels, `lds eval` alone takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
D=.venv/bin/diffattr
RUN=runs/lds-digits8
BENCH=benchmarks/lds/digits8
METHODS=das,dtrak,trak,grad-cos,pixel-cos,random

if [ "${1:-}" = "--rebuild" ]; then
  $D train --data digits --train-count 500 --val-count 200 --steps 1600 --batch-size 32 --out $RUN
  $D lds build $RUN --out $BENCH --subsets 24 --seeds 0,1 --measure-timesteps 100 \
    --num-val 200 --num-gen 200 --workers 2
fi
RUNARG=""
[ -d $RUN/model ] && RUNARG="--run $RUN"

# Main table: cross-fitted λ and the default rule, K = 10, 32 and 100 feature timesteps, F over
# 100 timesteps, 2 seeds.
$D lds eval $BENCH $RUNARG --method $METHODS --timesteps 10,32,100 --out $BENCH/results.md
# Ablation: F over 10 timesteps; one seed; both.
$D lds eval $BENCH $RUNARG --method das,dtrak,trak,pixel-cos,random --timesteps 10 \
  --measure-timesteps 10 --out $BENCH/ablation-F10.md
$D lds eval $BENCH $RUNARG --method das,dtrak,trak,pixel-cos,random --timesteps 10 \
  --seed-index 0 --out $BENCH/ablation-1seed.md
$D lds eval $BENCH $RUNARG --method das,dtrak,trak,pixel-cos,random --timesteps 10 \
  --seed-index 0 --measure-timesteps 10 --out $BENCH/ablation-1seed-F10.md
# Projection-dimension sweep (K = 10): dense Rademacher projections of the exact gradients.
for k in 256 1024 4096 8192; do
  $D lds eval $BENCH $RUNARG --method das,dtrak --timesteps 10 --projector rademacher \
    --proj-dim $k --batch-size 256 --out $BENCH/sweep-k$k.md
done
# Per-layer (logra) projection at ranks 8, 16, 32 (K = 10): k = 3,945 / 14,177 / 53,441 here.
for r in 8 16 32; do
  $D lds eval $BENCH $RUNARG --method das,dtrak,trak --timesteps 10 --projector logra \
    --proj-dim $r --out $BENCH/logra-r$r.md
done
# DAS variants (K = 10): residual weighting and the leverage correction.
$D lds eval $BENCH $RUNARG --method "das,das[residual=none],das[residual=signed],das[leverage=true]" \
  --timesteps 10 --out $BENCH/das-variants.md
