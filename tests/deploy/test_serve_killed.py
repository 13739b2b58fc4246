"""`moecluster serve` killed outright (SIGKILL: what `kill -9` and the OOM killer do) while streams run.

With its private Ray: within 15 s no process of that Ray is left (the raylet's agents used to outlive it by
minutes) and none of its ports is listening. Joined to a Ray cluster (`--ray-address`): that cluster keeps running,
and only what serve placed there goes away (its actors and its placement group's resources), by Ray's own rule for
a dead driver's actors.

serve runs in a session of its own, and only its pid is killed: the test never signals a process group.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from protos.client import InferenceClient
from protos.client_types import GenerationError
from tests.conftest import free_port
from tests.procs import _cmdline, descendants, descendants_running
from tests.ray_nodes import RayNode
from tests.sockets import listening_sockets

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_ray_left")]
STREAMS = 4
ORPHAN_BOUND_S = 15.0


def start_serve(*args: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """serve in a session of its own; (the process, its gRPC target)."""
    cmd = [sys.executable, "-m", "deploy.cli", "serve", "--port", "0", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    ready, _, _ = select.select([proc.stdout], [], [], 180)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("moecluster serving"):
        proc.kill()
        pytest.fail(f"serve did not start: {line!r}\n{proc.stderr.read()[-3000:]}")
    return proc, "127.0.0.1:" + line.rsplit(":", 1)[1].strip()


class Streams:
    """STREAMS long greedy streams on threads; each one's token count and how it ended."""

    def __init__(self, target: str):
        self.tokens = [0] * STREAMS
        self.errors: list[GenerationError | None] = [None] * STREAMS
        self.threads = [threading.Thread(target=self._run, args=(target, i), daemon=True) for i in range(STREAMS)]
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + 120
        while min(self.tokens) < 1:
            failed = any(e is not None for e in self.errors)
            assert not failed and time.monotonic() < deadline, f"not every stream started: {self.tokens} {self.errors}"
            time.sleep(0.02)

    def _run(self, target: str, i: int) -> None:
        try:
            with InferenceClient(target) as client:
                for chunk in client.generate(input_ids=[1, 5 + i, 9], max_tokens=2000, temperature=0, ignore_eos=True):
                    self.tokens[i] += len(chunk.token_ids)
        except GenerationError as e:
            self.errors[i] = e

    def ended(self, timeout_s: float = 30.0) -> list[grpc.StatusCode | None]:
        for t in self.threads:
            t.join(timeout=timeout_s)
        return [e.code if e else None for e in self.errors]


def start_time(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def still_running(snapshot: dict[int, int]) -> list[str]:
    """The processes of the snapshot (pid -> start time) that still run (a reused pid is another process)."""
    return [f"{pid} {_cmdline(pid)[:60]}" for pid, start in snapshot.items() if start_time(pid) == start]


def listening_ports() -> set[int]:
    ports = set()
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].split(":")[1], 16))
    return ports


def env_without_ray(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    return {**env, **extra}


def test_sigkill_of_serve_under_load_leaves_no_process_of_its_private_ray(tiny_model_dir):
    serve, target = start_serve("--model", tiny_model_dir, "--workers", "2", env=env_without_ray())
    snapshot: dict[int, int] = {}
    try:
        streams = Streams(target)
        tree = descendants(serve.pid)
        snapshot = {pid: start for pid in tree if (start := start_time(pid)) is not None}
        titles = " ".join(_cmdline(pid) for pid in snapshot)
        for expected in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RouterActor", "ray::ExpertWorker"):
            assert expected in titles, titles  # what the check below covers, so that it is not vacuous
        ports = {s.port for s in listening_sockets(serve.pid)}
        assert len(ports) >= 5, ports
        os.kill(serve.pid, signal.SIGKILL)
        killed = time.monotonic()
        serve.wait(timeout=10)
        while still_running(snapshot) or ports & listening_ports():
            assert time.monotonic() - killed < ORPHAN_BOUND_S, (
                f"{ORPHAN_BOUND_S:.0f}s after the SIGKILL: {still_running(snapshot)} still run, "
                f"ports {sorted(ports & listening_ports())} still listen"
            )
            time.sleep(0.2)
        assert streams.ended() == [grpc.StatusCode.UNAVAILABLE] * STREAMS
        assert "stopped" in serve.stderr.read()  # the reaper said what it did
    finally:
        for pid in [int(p.split()[0]) for p in still_running(snapshot)]:
            os.kill(pid, signal.SIGKILL)  # only what this test's serve started, so the next test starts clean
        if serve.poll() is None:
            serve.kill()


def test_sigkill_of_serve_on_a_joined_ray_leaves_that_ray_running_without_serves_actors(tiny_model_dir):
    gcs = free_port()
    head = RayNode("--head", f"--port={gcs}", "--num-cpus=4", "--include-dashboard=false")
    try:
        daemons = descendants_running(head.pid, "gcs_server") + descendants_running(head.pid, "/raylet")
        assert len(daemons) == 2, daemons
        env = env_without_ray(RAY_AUTH_MODE="disabled")
        joined = ("--ray-address", f"127.0.0.1:{gcs}")
        serve, target = start_serve("--model", tiny_model_dir, "--workers", "2", *joined, env=env)
        try:
            streams = Streams(target)
            assert actors_on(head) and not descendants_running(serve.pid, "raylet")  # it started no Ray of its own
            os.kill(serve.pid, signal.SIGKILL)
            serve.wait(timeout=10)
            assert streams.ended() == [grpc.StatusCode.UNAVAILABLE] * STREAMS
        finally:
            if serve.poll() is None:
                serve.kill()
        deadline = time.monotonic() + 60
        while actors_on(head) or not all_resources_free(gcs, env):
            assert time.monotonic() < deadline, f"serve's actors outlived it: {actors_on(head)}"
            time.sleep(0.5)
        assert all(start_time(pid) is not None for pid in daemons)  # the joined Ray itself was left alone
    finally:
        head.stop()


def actors_on(node: RayNode) -> list[int]:
    return [p for kind in ("Router", "ExpertWorker", "VisionEncoder") for p in descendants_running(node.pid, kind)]


FREE = "import ray, sys; ray.init(address=sys.argv[1]); print(ray.available_resources().get('CPU') == 4)"


def all_resources_free(gcs: int, env: dict[str, str]) -> bool:
    """Every CPU of the cluster available again: serve's placement group is gone."""
    out = subprocess.run([sys.executable, "-c", FREE, f"127.0.0.1:{gcs}"], capture_output=True, text=True, env=env)
    return out.stdout.strip().endswith("True")
