"""`ray job submit` as a user runs it: a Ray head started with `ray start --head`, the serve entrypoint
submitted with the working directory, health over gRPC, a streamed generation, then `ray job stop` and
`ray stop`, leaving no Ray process behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protos.client import InferenceClient
from tests.conftest import free_port
from tests.procs import descendants_running, ray_gone, ray_processes
from tests.ray_nodes import RayNode

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ray_env():
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",  # explicit: a private head for this test only
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    return env


def ray(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_ray_job_submit_on_a_two_cpu_head_serves_streams_and_stops_cleanly(tmp_path, ray_env):
    """The README's path on a small head: `ray start --head` with 2 CPUs, then `ray job submit ... --config
    deploy/configs/tiny-cpu.yaml` (its fractional CPUs fit a router and two workers there)."""
    assert ray_gone(), "another Ray is running; this test checks that ours leaves nothing behind"
    from deploy.tiny.model import write_tiny_model

    model = write_tiny_model(tmp_path / "model", "scout", train_steps=0)
    port, gcs_port, dashboard = free_port(), free_port(), free_port()
    head = RayNode(
        "--head",
        f"--port={gcs_port}",
        f"--dashboard-port={dashboard}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=2",
        env=ray_env,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        submitted = ray(
            ray_env,
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(REPO),
            "--no-wait",
            "--",
            "python",
            "-m",
            "deploy.ray_job",
            "--config",
            "deploy/configs/tiny-cpu.yaml",
            "--model",
            str(model),
            "--port",
            str(port),
            "--http-port",
            "0",
            timeout=300,
        )
        assert submitted.returncode == 0, submitted.stderr + submitted.stdout
        job_id = re.search(r"(raysubmit_\w+)", submitted.stdout + submitted.stderr).group(1)
        with InferenceClient(f"127.0.0.1:{port}") as client:
            try:
                client.wait_until_serving(timeout=240)
            except Exception:  # noqa: BLE001 - any failure to serve: show the job's log
                logs = ray(ray_env, "job", "logs", "--address", address, job_id)
                pytest.fail(f"the job never served:\n{logs.stdout[-3000:]}")
            chunks = list(client.generate(input_ids=[1, 5, 9, 13], max_tokens=8, temperature=0, ignore_eos=True))
        assert sum(len(c.token_ids) for c in chunks) == 8
        stopped = ray(ray_env, "job", "stop", "--address", address, job_id, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        status = ray(ray_env, "job", "status", "--address", address, job_id)
        assert "stopped" in (status.stdout + status.stderr).lower()
        deadline = time.monotonic() + 30
        while descendants_running(head.pid, "ray::RouterActor") + descendants_running(head.pid, "ray::ExpertWorker"):
            assert time.monotonic() < deadline, "the job's actors outlived `ray job stop`"
            time.sleep(0.5)
    finally:
        head.stop()
    assert ray_gone(30), ray_processes()
