"""The README's first command, as a new user runs it: `moecluster demo` on an empty cache copies the shipped
tiny model, serves it on a local Ray with 2 expert workers and a vision encoder, streams checkable answers over gRPC
(an image's among them), and stops cleanly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.procs import ray_gone, ray_processes

pytestmark = pytest.mark.slow


def test_demo_streams_counting_and_image_answers_and_leaves_nothing_running(tmp_path):
    env = {**os.environ, "MOECLUSTER_CACHE": str(tmp_path / "cache"), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "demo"], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "moecluster serving tiny-scout on 127.0.0.1:" in out
    assert "assistant: 18 19 20 21 22 23 24 25" in out  # "count from 17", answered by the trained model
    assert "assistant: 59 60 61 62 63 64 65 66" in out
    assert "square, " in out and "What colour is the square?\nassistant: red   [stop" in out  # the image, answered
    assert "0-7" in out and "8-15" in out  # the status table: where the experts live (16 on 2 workers)
    assert (tmp_path / "cache" / "tiny-scout-v3" / "config.json").is_file()
    assert ray_gone(), ray_processes()
