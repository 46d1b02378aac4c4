#!/usr/bin/env bash
# GPU check (≤ 5 minutes), to run whenever a GPU machine is available:
#   bash benchmarks/gpu_check.sh            # writes $OUT/gpu_check.md, or benchmarks/gpu_check.md
# Prints featurize throughput on the cifar preset on cuda (fp32 and bf16 gradients), projection
# speed (countsketch, sparse-jl, rademacher, and traker's CUDA projector when fast_jl is
# installed) and the agreement of GPU and CPU features on a few samples. Fails loudly without a
# CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT_DIR=${OUT:-benchmarks}

has_cuda_torch() {  # $1: python; true when it imports torch and diffusers and sees a GPU
    "$1" - <<'PY' 2>/dev/null
import sys
import diffusers, torch  # noqa: F401
sys.exit(0 if torch.cuda.is_available() else 1)
PY
}

PY=""
if [ -x "$VENV/bin/python" ] && has_cuda_torch "$VENV/bin/python"; then
    PY="$VENV/bin/python"
elif command -v python3 >/dev/null && has_cuda_torch python3; then
    PY=python3                       # a machine image with CUDA torch: use it with the source
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
elif [ ! -x "$VENV/bin/python" ]; then
    echo "gpu_check: creating $VENV like the Makefile (make install)" >&2
    # the Makefile's torch spec; on a GPU machine the default index serves a CUDA build
    make install TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}" >&2
    PY="$VENV/bin/python"
else
    PY="$VENV/bin/python"
fi

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: FAILED — no CUDA GPU visible to torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1))." >&2
    echo "gpu_check: run it on a GPU machine with a CUDA build of torch (nvidia-smi must list a GPU)." >&2
    exit 1
fi

exec timeout 290 "$PY" benchmarks/gpu_check.py --device cuda --out "$OUT_DIR"
