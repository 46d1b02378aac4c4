#!/usr/bin/env bash
# The model-based baselines on the committed digits 8×8 LDS benchmark (needs the full model,
# runs/lds-digits8, from `benchmarks/lds_digits8.sh --rebuild`).
# Usage: benchmarks/lds_digits8_baselines.sh [baselines|model|model-k100|ensembles|ensembles-k100|ekfac|ekfac-k100|unnormalised-k100|combinations|combinations-ekfac|screened-k100]...
# (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
D=.venv/bin/diffattr
RUN=runs/lds-digits8
BENCH=benchmarks/lds/digits8
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(baselines model model-k100 ensembles ensembles-k100 ekfac ekfac-k100 unnormalised-k100 combinations combinations-ekfac screened-k100)

for stage in "${stages[@]}"; do
  case $stage in
    baselines)  # influence-function variants (cached loss kernels), gradient dot, image baselines
      $D lds eval $BENCH --run $RUN --method relative-if,renormalized-if,grad-dot,embedding-cos,pixel-dot \
        --timesteps 10,100 --out $BENCH/baselines.md
      ;;
    model)  # Journey-TRAK, TracIn and GAS at K = 10
      $D lds eval $BENCH --run $RUN --method journey-trak,tracin,gas --timesteps 10 \
        --out $BENCH/baselines-model.md
      ;;
    model-k100)  # Journey-TRAK, TracIn and GAS at K = 100 (K = 10: baselines-model.md)
      $D lds eval $BENCH --run $RUN --method journey-trak,tracin,gas --timesteps 100 \
        --out $BENCH/baselines-model-K100.md
      ;;
    ensembles|ensembles-k100)  # TRAK-style: the full model and two more (seeds 1 and 2)
      K=10 OUT=$BENCH/ensembles.md
      [ "$stage" = ensembles-k100 ] && K=100 OUT=$BENCH/ensembles-K100.md
      for s in 1 2; do
        [ -d $RUN-seed$s/model ] || $D train --data digits --train-count 500 --val-count 200 \
          --steps 1600 --batch-size 32 --seed $s --out $RUN-seed$s
      done
      M="models=$RUN-seed1/model,$RUN-seed2/model"
      $D lds eval $BENCH --run $RUN --timesteps $K --out $OUT \
        --method "das,ensemble[base=das;$M],dtrak,ensemble[base=dtrak;$M],trak,ensemble[base=trak;$M]"
      ;;
    ekfac|ekfac-k100)  # EK-FAC influence (kronfluence): the diffusion loss as objective, three queries
      K=10 OUT=$BENCH/ekfac.md
      [ "$stage" = ekfac-k100 ] && K=100 OUT=$BENCH/ekfac-K100.md
      $D lds eval $BENCH --run $RUN --timesteps $K --out $OUT \
        --method "ekfac,ekfac[query=das],ekfac[query=dtrak]"
      ;;
    unnormalised-k100)  # TRAK and DAS without per-timestep normalisation, as EK-FAC's gradients
      $D lds eval $BENCH --run $RUN --timesteps 100 --no-normalize --method trak,das \
        --out $BENCH/unnormalised-K100.md
      ;;
    combinations)  # DAS and TRAK combined (per-target standardised scores, equal weights), from
      # the cached kernels
      $D lds eval $BENCH --run $RUN --timesteps 10,32,100 --out $BENCH/combinations.md \
        --method "combine[methods=das+trak]"
      ;;
    combinations-ekfac)  # attempts to beat EK-FAC that need its factors (≈ 25 min at K = 100):
      # normalised EK-FAC, DAS's features with EK-FAC's curvature, DAS combined with EK-FAC
      $D lds eval $BENCH --run $RUN --timesteps 100 --out $BENCH/combinations-K100.md \
        --method "ekfac,ekfac[normalize=true],ekfac[query=das;train=das],combine[methods=das+ekfac],combine[methods=das+ekfac[normalize=true]],combine[methods=das+trak+ekfac]"
      ;;
    screened-k100)  # each method's scores kept on the target's M pixel-nearest training images
      # (kernel on all N), from the cached kernels and EK-FAC scores of combinations-ekfac
      $D lds eval $BENCH --run $RUN --timesteps 100 --out $BENCH/screened-K100.md \
        --method "das,ekfac,combine[methods=das+ekfac]" --screen pixel-cos:25,pixel-cos:50
      ;;
    *) echo "unknown stage: $stage (baselines|model|model-k100|ensembles|ensembles-k100|ekfac|ekfac-k100|unnormalised-k100|combinations|combinations-ekfac|screened-k100)" >&2; exit 2 ;;
  esac
done
