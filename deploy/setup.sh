#!/usr/bin/env bash
# Creates .venv at the repository root and installs moecluster with its test extras.
# torch is pinned to the CPU build this project's machines carry on disk; on a GPU machine set
# MOECLUSTER_TORCH to the torch requirement of your CUDA build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip_install() {  # quiet, minus the warnings about this machine's absent local package folders
  .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}
pip_install --upgrade pip
pip_install "${MOECLUSTER_TORCH:-torch==2.13.0}"
pip_install -e ".[test]"
.venv/bin/python -c "import torch, ray, grpc, safetensors, tokenizers, transformers; print('moecluster environment ready: torch', torch.__version__, '| ray', ray.__version__)"
