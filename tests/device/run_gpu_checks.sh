#!/usr/bin/env bash
# One device call: parity on CUDA, then each benchmark beside its baseline. Logs go to $OUT (or /tmp/out).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD
run() { echo "== $*"; timeout "${STEP_TIMEOUT:-120}" "$@" 2>>"$OUT/stderr.log"; echo; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, safetensors, tokenizers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
  run python3 tests/device/gpu_checks.py
  STEP_TIMEOUT=300 run python3 tests/device/fp8_checks.py
  run python3 -m deploy.cli bench decode --device cuda --dtype bfloat16 --new-tokens 64
  run python3 -m deploy.cli bench moe-layer --device cuda --tokens 1,8,64,256,1024,4096 --iters 20
  run python3 -m deploy.cli bench collective --device cuda --tokens 1,16,256 --iters 50
  STEP_TIMEOUT=300 run python3 -m deploy.cli bench sampler --device cuda --parts step --rows 1,64,256 --iters 8
  run python3 -m deploy.cli bench engine --device cuda --dtype bfloat16 --workers 0 --new-tokens 64
  run python3 -m deploy.cli bench engine --device cuda --dtype bfloat16 --workers 0 --new-tokens 64 --expert-dtype fp8
} 2>&1 | tee "$OUT/summary.txt"
