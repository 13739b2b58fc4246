"""`moecluster bench grpc`: its clients run in a process of their own (deploy/bench/front_clients.py), whose
failures are errors naming what failed, never a hang; and the whole benchmark, on a real server, prints a row for
the engine baseline and for each front with its figures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from deploy.bench.front_clients import BenchClientError, FrontClients

NOWHERE = SimpleNamespace(target="127.0.0.1:1", gateway=SimpleNamespace(http_port=1), model_name="m")


def test_an_unknown_front_is_an_error_naming_the_allowed_ones_and_the_process_goes_on():
    with FrontClients(timeout_s=60) as clients:
        with pytest.raises(BenchClientError, match="front: must be one of moecluster, kserve, openai, got 'http2'"):
            clients.run("http2", NOWHERE, [[1, 2]], 2)
        with pytest.raises(BenchClientError, match="moecluster: "):  # nothing listens there: refused, not hung
            clients.run("moecluster", NOWHERE, [[1, 2]], 2)
        assert clients.proc.poll() is None


def test_a_client_process_that_dies_is_an_error_saying_so():
    with FrontClients(timeout_s=60) as clients:
        os.kill(clients.proc.pid, signal.SIGKILL)
        clients.proc.wait(timeout=10)
        with pytest.raises(BenchClientError, match="client process"):
            clients.run("moecluster", NOWHERE, [[1, 2]], 2)


@pytest.mark.slow
def test_the_benchmark_prints_the_baseline_and_every_front():
    cmd = [sys.executable, "-m", "deploy.cli", "bench", "grpc", "--front", "moecluster,kserve,openai"]
    cmd += ["--concurrency", "1,2", "--rounds", "1", "--workers", "0", "--new-tokens", "8", "--prompt-len", "8"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stdout + out.stderr and "Event loop is closed" not in out.stderr
    paths = ("engine via Ray (baseline)", "moecluster.v1 (gRPC)", "KServe v2 (tritonclient)", "OpenAI (openai SDK)")
    for streams in (1, 2):
        for path in paths:
            (row,) = [line for line in out.stdout.splitlines() if path in line and line.split()[1] == str(streams)]
            figures = row.split(path)[1].split()
            assert len(figures) == 7 and all(float(f) > 0 for f in figures), row
