"""What a gRPC client sees when an expert worker dies: nothing but a pause (every stream completes with the
tokens of an undisturbed run, readiness stays SERVING, status and metrics show the failover); and when its
replacements keep failing and an expert has no live copy left: UNAVAILABLE naming why, and liveness
NOT_SERVING so the orchestrator restarts the pod. The kill comes once every stream generates with tokens left, and
the test checks that every stream got tokens before and after it."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import urllib.request

import grpc
import pytest

from deploy.bench.interruption import StreamLog, interrupted, kill_when_ready, ready_to_kill, too_late
from deploy.server import Server
from protos.client import InferenceClient
from protos.client_types import GenerationError
from tests.procs import pid_of
from tests.router.gateway.harness import serve_config, start_streams

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_ray_left")]
STREAMS = 8
TOKENS = 120


def serve(model_dir, **cluster) -> Server:
    config = serve_config(
        model_dir,
        cluster={"workers": 2, **cluster},
        gateway={"expert_stats_interval_s": 0.2},
        metrics={"enabled": True, "port": 0, "host": "127.0.0.1"},
    )
    return Server(config, show_progress=False).start()


def run_streams(target: str, results: dict, errors: list, logs: list[StreamLog] | None = None):
    """STREAMS streaming requests on threads; their tokens in `results`, arrival times in `logs` (when given)."""
    logs = logs if logs is not None else [StreamLog(TOKENS) for _ in range(STREAMS)]
    requests = [
        dict(input_ids=[1, 7 + i, 3], max_tokens=TOKENS, ignore_eos=True)
        | ({"temperature": 0.0} if i % 2 else {"temperature": 0.8, "seed": 100 + i})
        for i in range(STREAMS)
    ]
    return start_streams(target, requests, results, errors, logs)


def metric(server, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.gateway.metrics_port}/metrics", timeout=10).read()
    for line in text.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_a_worker_killed_mid_stream_costs_the_client_nothing(tiny_model_dir):
    server = serve(tiny_model_dir)
    try:
        undisturbed, errors = {}, []
        for t in run_streams(server.target, undisturbed, errors):
            t.join(timeout=120)
        assert not errors and len(undisturbed) == STREAMS
        victim = pid_of(server.cluster.workers[1])
        results, readiness, logs = {}, [], [StreamLog(TOKENS) for _ in range(STREAMS)]
        with InferenceClient(server.target) as client:
            threads = run_streams(server.target, results, errors, logs)
            killed = kill_when_ready(
                lambda: ready_to_kill(logs), lambda: too_late(logs), lambda: os.kill(victim, signal.SIGKILL)
            )
            while any(t.is_alive() for t in threads):
                readiness.append(client.health_status())
                time.sleep(0.05)
            assert not errors, errors
            assert results == undisturbed
            assert interrupted([log.times for log in logs], killed)
            assert set(readiness) == {"SERVING"}  # a failover holds requests; it never refuses them
            deadline = time.monotonic() + 60
            while client.cluster_status().workers[1].state != "serving":
                assert time.monotonic() < deadline, "the replacement never served"
                time.sleep(0.2)
            status = client.cluster_status()
        plane = status.expert_plane
        assert plane.failovers >= 1 and plane.worker_deaths == 1 and plane.replacements_succeeded == 1
        assert list(plane.members) == [0, 1] and status.workers[1].replacements == 1
        assert status.workers[1].pid != victim
        time.sleep(0.5)
        assert metric(server, "moecluster_failovers_total") >= 1
        assert metric(server, "moecluster_failover_stall_seconds_count") >= 1
    finally:
        server.stop(grace_s=2.0)


def test_when_replacements_keep_failing_requests_end_unavailable_and_liveness_fails(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    server = serve(copy, max_replacement_failures=2)
    try:
        with InferenceClient(server.target) as client:
            client.wait_until_serving(timeout=30)
            victim = pid_of(server.cluster.workers[0])
            shutil.move(copy, tmp_path / "gone")  # running actors keep their weights; a replacement cannot load
            gen = client.generate(input_ids=[1, 2, 3], max_tokens=2000, temperature=0.0, ignore_eos=True)
            got, errors = [], []

            def read():
                try:
                    for chunk in gen:
                        got.extend(chunk.token_ids)
                except GenerationError as e:
                    errors.append(e)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            while len(got) < 3:
                time.sleep(0.05)
            os.kill(victim, signal.SIGKILL)
            reader.join(timeout=120)
            assert not reader.is_alive(), "the stream hung after the replacements failed"
            (error,) = errors
            assert error.code == grpc.StatusCode.UNAVAILABLE and "replacements failed" in error.message, error
            deadline = time.monotonic() + 10
            while client.health_status("") != "NOT_SERVING":
                assert time.monotonic() < deadline, "liveness stayed SERVING"
                time.sleep(0.1)
            assert client.health_status() == "NOT_SERVING"
            with pytest.raises(GenerationError) as refused:
                client.generate_text(input_ids=[1, 2], max_tokens=2, timeout=30)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            assert "replacements failed" in client.cluster_status().expert_plane.failure
    finally:
        server.stop(grace_s=2.0)
