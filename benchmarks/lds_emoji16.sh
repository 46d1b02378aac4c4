#!/usr/bin/env bash
# The colour LDS benchmark: emoji at 16×16 RGB (Noto Emoji, `diffattr data install emoji`),
# N = 1,000, the `small` UNet (2.7M parameters), 2,400 steps of batch 32, 20 half-subsets × 2
# seeds, 100 held-out real and 100 generated targets, F over 100 timesteps.
#
#   benchmarks/lds_emoji16.sh --rebuild [STAGE…]
#       train the run (one thread, ≈ 13 min) and build the ground truth: 40 subset models in
#       2 one-thread workers (≈ 13–15 min each: ≈ 5 h on 2 cores). Resumable: each finished
#       model's F.npy is committed (benchmarks/lds/emoji16/models/*/F.npy), so a build that
#       one session leaves unfinished goes on in the next from those.
#   benchmarks/lds_emoji16.sh --build-only   (after --rebuild) stop after the build
#   benchmarks/lds_emoji16.sh [STAGE…]
#       the tables, from the committed ground truth and kernel caches (the first run computes
#       the kernels from the run's model: hours; later runs take seconds to minutes).
# Stages, in order (default: all): ekfac combine logra screens screening confidence lambda
# defaults ceiling-check (defaults last: it gathers every configuration from the caches the
# others leave; run alone first, it computes them itself).
# "defaults" is today's configurations unchanged, reported before anything is tuned here.
set -euo pipefail
cd "$(dirname "$0")/.."
D=.venv/bin/diffattr
PY=.venv/bin/python
RUN=runs/lds-emoji16
BENCH=benchmarks/lds/emoji16

if [ "${1:-}" = "--rebuild" ]; then
  $D data install emoji
  [ -f $RUN/model/config.json ] || $D train --data emoji16 --train-count 1000 --val-count 200 \
    --preset small --steps 2400 --batch-size 32 --threads 1 --quiet --out $RUN
  $D lds build $RUN --out $BENCH --subsets 20 --seeds 0,1 --measure-timesteps 100 \
    --num-val 100 --num-gen 100 --executor local --workers "${WORKERS:-2}"
  shift
fi
[ "${1:-}" = "--build-only" ] && exit 0
RUNARG=""
[ -d $RUN/model ] && RUNARG="--run $RUN"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(ekfac combine logra screens screening confidence lambda defaults ceiling-check)

for stage in "${stages[@]}"; do
  case $stage in
    defaults)  # one table of today's configurations, unchanged: the kernel methods and EK-FAC
      # at K = 10, 32, 100 (cross-fitted, oracle and default λ) and the image baselines, each
      # unscreened and with the pixel and embedding screens (kernel on all N); EK-FAC's factors
      # and every kernel come from the caches the stages below (and earlier runs) leave
      $D lds eval $BENCH $RUNARG --method das,dtrak,trak,ekfac,pixel-cos,embedding-cos,random \
        --timesteps 10,32,100 --out $BENCH/results.md --screen \
        none,pixel-cos:2%,pixel-cos:5%,pixel-cos:10%,pixel-cos:20%,embedding-cos:5%,embedding-cos:10%
      ;;
    ekfac)  # EK-FAC influence (kronfluence, loss query) at K = 32 and 100
      $D lds eval $BENCH $RUNARG --method ekfac --timesteps 32,100 --out $BENCH/ekfac.md
      ;;
    combine)  # DAS + EK-FAC (per-target standardised scores, equal weights)
      $D lds eval $BENCH $RUNARG --timesteps 32,100 --out $BENCH/combinations.md \
        --method "combine[methods=das+ekfac],combine[methods=das+trak]"
      ;;
    logra)  # per-layer projection, rank 16 (K = 32)
      $D lds eval $BENCH $RUNARG --method das,dtrak,trak --timesteps 32 --projector logra \
        --proj-dim 16 --out $BENCH/logra-r16.md
      ;;
    screens)  # pixel and embedding screens at M = 2/5/10/20 % with the kernel on all N, for
      # DAS (default K) and DAS + EK-FAC; the union kernel and the confidence in the scripts
      # below
      $D lds eval $BENCH $RUNARG --timesteps 32 --out $BENCH/screened-K32.md \
        --method "das,combine[methods=das+ekfac]" \
        --screen pixel-cos:2%,pixel-cos:5%,pixel-cos:10%,pixel-cos:20%,embedding-cos:5%,embedding-cos:10%
      $D lds eval $BENCH $RUNARG --timesteps 32 --out $BENCH/screened-pixel-cos.md \
        --method pixel-cos --screen pixel-cos:2%,pixel-cos:5%,pixel-cos:10%,pixel-cos:20%
      ;;
    screening)  # the screen's kernels (union, candidates, all) and cross-fitted M, beside the
      # 8×8 benchmarks, from the kernel caches
      $PY benchmarks/screening.py benchmarks/lds/digits8 benchmarks/lds/mnist8 $BENCH \
        --out benchmarks/results/screening-emoji16.md
      ;;
    confidence)  # today's κ and its cut points (chosen on digits8), reported on emoji16
      $PY benchmarks/confidence.py benchmarks/lds/digits8 $BENCH \
        --out benchmarks/results/confidence-emoji16.md
      ;;
    lambda)  # the λ rule's gap to the cross-fitted λ
      $PY benchmarks/lambda_rule.py benchmarks/lds/digits8 benchmarks/lds/mnist8 $BENCH \
        --out benchmarks/results/lambda-rule-emoji16.md
      ;;
    ceiling-check)  # every row at or below the noise ceiling
      $PY - "$BENCH" <<'PYEOF'
import json, sys
from pathlib import Path
bench = Path(sys.argv[1])
worst = []
for f in sorted(bench.glob("*.json")):
    if f.name in ("lds.json",):
        continue
    rows = json.loads(f.read_text())
    rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
    ceil = {k: r[k]["lds"] for r in rows if r.get("method") == "noise ceiling"
            for k in ("val", "gen") if k in r}
    for r in rows:
        for k, c in ceil.items():
            v = (r.get(k) or {}).get("lds")
            if r.get("method") not in ("noise ceiling", "seed agreement") and v is not None and v > c:
                worst.append((f.name, r["method"], r.get("timesteps"), k, v, c))
for w in worst:
    print("ABOVE THE CEILING:", *w)
sys.exit(1 if worst else 0)
PYEOF
      ;;
    *) echo "unknown stage: $stage (see the header)" >&2; exit 2 ;;
  esac
done
