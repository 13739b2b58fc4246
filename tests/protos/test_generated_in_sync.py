"""The committed generated modules are exactly what protos/generate.sh makes from the .proto today."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def test_committed_generated_modules_match_fresh_generation(tmp_path):
    subprocess.run(
        ["bash", str(ROOT / "protos" / "generate.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    fresh_dir = tmp_path / "protos" / "moecluster" / "v1"
    for name in GENERATED:
        fresh, committed = (fresh_dir / name).read_bytes(), (ROOT / "protos" / "moecluster" / "v1" / name).read_bytes()
        assert fresh == committed, f"protos/moecluster/v1/{name} is stale: run protos/generate.sh and commit the result"


def test_generated_grpc_module_imports_through_the_project_package():
    text = (ROOT / "protos" / "moecluster" / "v1" / "inference_pb2_grpc.py").read_text()
    assert "from protos.moecluster.v1 import inference_pb2" in text
