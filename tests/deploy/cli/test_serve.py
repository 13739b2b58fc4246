"""`moecluster serve` as an operator runs it: readiness NOT_SERVING while starting, then SERVING and exactly one
line on stdout; the client commands work against it; SIGTERM drains (NOT_SERVING at once, new work refused,
open streams finish within the grace period, the rest are aborted) and the process exits 0 leaving no Ray
process behind."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.client import InferenceClient
from protos.client_types import GenerationError
from tests.conftest import free_port

pytestmark = pytest.mark.slow

GRACE_S = 4.0
RAY_NAMES = ("raylet", "gcs_server", "ray::")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from deploy.tiny.model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-scout"), "scout", train_steps=0)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _ray_descendants(root: int) -> dict[int, str]:
    """Ray's processes under `root` (its gcs_server and raylet, and the raylet's actor processes)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            text = _cmdline(child)
            if any(name in text for name in RAY_NAMES):
                found[child] = text[:80]
    return found


def _read_line(stream, timeout_s: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout_s)
    return stream.readline() if ready else ""


class HealthWatch:
    """grpc.health.v1 Watch on readiness from before the server listens; records each status it is sent."""

    def __init__(self, target: str):
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 300),
            ],
        )
        self.statuses: list[str] = []
        request = health_pb2.HealthCheckRequest(service="moecluster.v1.Inference")
        self._call = health_pb2_grpc.HealthStub(self.channel).Watch(request, wait_for_ready=True, timeout=300)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for response in self._call:
                self.statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
        except grpc.RpcError:
            pass  # the server went away

    def close(self):
        self._call.cancel()
        self.channel.close()


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_serve_prints_one_line_serves_clients_drains_on_sigterm_and_leaves_no_ray(model_dir, tmp_path):
    port = free_port()
    target = f"127.0.0.1:{port}"
    stderr = open(tmp_path / "serve.err", "w+")
    cmd = [
        sys.executable,
        "-m",
        "deploy.cli",
        "serve",
        "--model",
        str(model_dir),
        "--workers",
        "2",
        "--port",
        str(port),
        "--http-port",
        "0",
        "--drain-grace-s",
        str(GRACE_S),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"}
    )
    watch = HealthWatch(target)
    try:
        line = _read_line(proc.stdout, timeout_s=180)
        stderr.seek(0)
        assert line == f"moecluster serving {Path(model_dir).name} on {target}\n", (line, stderr.read())
        ray_processes = _ray_descendants(proc.pid)
        assert ray_processes, "expected the server's Ray processes under it"
        assert watch.statuses[:2] == ["NOT_SERVING", "SERVING"], watch.statuses  # starting, then ready

        generated = _cli(
            "client",
            "generate",
            "--target",
            target,
            "12 13 14",
            "--max-tokens",
            "6",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        )
        assert generated.returncode == 0, generated.stderr
        assert '"finish_reason": "length"' in generated.stdout and '"completion_tokens": 6' in generated.stdout
        status = _cli("client", "status", "--target", target)
        assert status.returncode == 0, status.stderr
        assert "readiness SERVING" in status.stdout and "8-15" in status.stdout  # worker 1's experts
        assert f"inference.GRPCInferenceService   grpc://127.0.0.1:{port}" in status.stdout  # the fronts it serves
        assert "openai" in status.stdout and "http://127.0.0.1:" in status.stdout

        with InferenceClient(target) as client:
            _drain_on_sigterm(proc, client, watch)
        assert proc.wait(timeout=90) == 0
        stderr.seek(0)
        assert "Traceback" not in stderr.read()
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in ray_processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {pid: text for pid, text in ray_processes.items() if _alive(pid)}
        assert not left, f"Ray processes left behind: {left}"
        with socket.socket() as s:  # and no port: nothing listens on the gateway's port any more
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a restarted server would
            s.bind(("127.0.0.1", port))
    finally:
        watch.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _drain_on_sigterm(proc, client, watch) -> None:
    short = client.generate(input_ids=[1, 2, 3], max_tokens=60, temperature=0.0, ignore_eos=True)
    long = client.generate(input_ids=[4, 5, 6], max_tokens=1500, temperature=0.0, ignore_eos=True)
    streams = {"short": iter(short), "long": iter(long)}
    first = {name: next(it) for name, it in streams.items()}  # both are running
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    while watch.statuses[-1] != "NOT_SERVING":
        assert time.monotonic() - sent < 5, watch.statuses
        time.sleep(0.05)
    with pytest.raises(GenerationError) as refused:
        client.generate_text(input_ids=[7, 8], max_tokens=2, timeout=10)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    tokens = {
        name: list(first[name].token_ids) + [t for chunk in it for t in chunk.token_ids] for name, it in streams.items()
    }
    assert (short.result.finish_reason, len(tokens["short"])) == ("length", 60)  # finished within the grace
    assert long.result.finish_reason == "abort" and len(tokens["long"]) < 1500  # cut at the end of the grace
    assert time.monotonic() - sent >= GRACE_S - 0.5
