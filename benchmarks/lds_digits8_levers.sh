#!/usr/bin/env bash
# The two variance-reduction levers the main digits 8×8 benchmark cannot switch off after the
# fact (each needs its own ground truth; ≈40 min each on 2 cores):
#   independent — common random numbers off: every subset model gets its own initial weights
#                 and its own noise/timestep streams (same run, targets and subsets);
#   steps800    — half the training (800 instead of 1,600 steps) for the full model and every
#                 subset model; its own run (runs/lds-digits8-steps800), targets and features;
#                 one seed per subset (compare with the main benchmark's one-seed ablation).
# Usage: benchmarks/lds_digits8_levers.sh [independent|steps800|eval]...  (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
D=.venv/bin/diffattr
RUN=runs/lds-digits8
MAIN=benchmarks/lds/digits8
METHODS=das,dtrak,trak,pixel-cos,random
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(independent steps800 eval)

for stage in "${stages[@]}"; do
  case $stage in
    independent)
      [ -d $RUN/model ] || $D train --data digits --train-count 500 --val-count 200 \
        --steps 1600 --batch-size 32 --out $RUN
      $D lds build $RUN --out benchmarks/lds/digits8-independent --subsets 24 --seeds 0,1 \
        --measure-timesteps 100 --num-val 200 --num-gen 200 --workers 2 --independent
      ;;
    steps800)
      [ -d $RUN-steps800/model ] || $D train --data digits --train-count 500 --val-count 200 \
        --steps 800 --batch-size 32 --out $RUN-steps800
      $D lds build $RUN-steps800 --out benchmarks/lds/digits8-steps800 --subsets 24 \
        --seeds 0 --measure-timesteps 100 --num-val 200 --num-gen 200 --workers 2
      ;;
    eval)
      # Same targets and training set as the main benchmark: its kernels apply unchanged.
      mkdir -p benchmarks/lds/digits8-independent/kernels
      cp -n $MAIN/kernels/*.npz benchmarks/lds/digits8-independent/kernels/ 2>/dev/null || true
      $D lds eval benchmarks/lds/digits8-independent --run $RUN --method $METHODS \
        --timesteps 10 --out benchmarks/lds/digits8-independent/ablation-crn-off.md
      $D lds eval benchmarks/lds/digits8-steps800 --run $RUN-steps800 --method $METHODS \
        --timesteps 10 --out benchmarks/lds/digits8-steps800/ablation-steps800.md
      $D lds eval benchmarks/lds/digits8-independent --run $RUN --method $METHODS \
        --timesteps 10 --seed-index 0 --out benchmarks/lds/digits8-independent/ablation-crn-off-1seed.md
      ;;
    *) echo "unknown stage: $stage (independent|steps800|eval)" >&2; exit 2 ;;
  esac
done
