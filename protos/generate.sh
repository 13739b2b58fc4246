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
  protos/moecluster/v1/inference.proto protos/kserve/v2/grpc_predict_v2.proto
# KServe v2 registers its `inference.*` messages in a descriptor pool of its own: tritonclient registers the same
# names in the default pool, and one process may hold both (see the header of grpc_predict_v2.proto)
sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile(/' \
  "$out/protos/kserve/v2/grpc_predict_v2_pb2.py"
