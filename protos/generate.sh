#!/usr/bin/env bash
# Regenerates the Python modules of protos/**/*.proto in place (they are committed; a test checks they match).
# Usage: protos/generate.sh [OUT_DIR]   (OUT_DIR defaults to the repository root, i.e. in place)
# Paths are relative to the repository root so the generated gRPC module imports
# `protos.moecluster.v1.inference_pb2`, the package path this project uses.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root}"
python="${PYTHON:-python}"
if [ -x "$root/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then python="$root/.venv/bin/python"; fi
cd "$root"
mkdir -p "$out"
"$python" -m grpc_tools.protoc -I . --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/moecluster/v1/inference.proto
