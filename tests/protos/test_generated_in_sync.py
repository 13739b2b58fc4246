"""The committed generated modules are exactly what protos/generate.sh makes from the .proto today."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = {
    "moecluster/v1": ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py"),
    "kserve/v2": ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py"),
}


def test_committed_generated_modules_match_fresh_generation(tmp_path):
    subprocess.run(
        ["bash", str(ROOT / "protos" / "generate.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    for folder, names in GENERATED.items():
        for name in names:
            fresh, committed = (tmp_path / "protos" / folder / name).read_bytes(), (ROOT / "protos" / folder / name)
            assert fresh == committed.read_bytes(), (
                f"protos/{folder}/{name} is stale: run protos/generate.sh and commit the result"
            )


def test_generated_grpc_module_imports_through_the_project_package():
    text = (ROOT / "protos" / "moecluster" / "v1" / "inference_pb2_grpc.py").read_text()
    assert "from protos.moecluster.v1 import inference_pb2" in text


def test_kserve_messages_live_in_a_pool_of_their_own():
    """tritonclient registers the same `inference.*` names in the default pool: both load in one process."""
    text = (ROOT / "protos" / "kserve" / "v2" / "grpc_predict_v2_pb2.py").read_text()
    assert "_descriptor_pool.DescriptorPool().AddSerializedFile(" in text
    assert "_descriptor_pool.Default()" not in text
