"""`moecluster bench routers`' failover run on a real server (1 router, 2 expert workers, the tiny model): a kill
that comes after the load is reported as such ("kill landed after the load", no gap), and the benchmark's own
timing (requests sized from the measured rate, the kill once every stream generates) interrupts every stream,
which all complete."""

from __future__ import annotations

import argparse
import asyncio
import time

import pytest

from deploy.bench import routers
from deploy.bench.interruption import AFTER_LOAD
from protos.client import InferenceClient

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_ray_left")]


def wait_replaced(target: str, replacements: int, timeout_s: float = 120.0) -> None:
    """Router 0 replaced and serving, and the gateway's readiness (polled) back to SERVING: until then it refuses
    new requests."""
    deadline = time.monotonic() + timeout_s
    with InferenceClient(target) as client:
        while (r := client.cluster_status().routers[0]).state != "serving" or r.replacements < replacements:
            assert time.monotonic() < deadline, "router 0 was never replaced"
            time.sleep(0.3)
        while client.health_status() != "SERVING":
            assert time.monotonic() < deadline, "readiness never returned to SERVING"
            time.sleep(0.1)


def test_the_router_failover_row_reports_a_late_kill_and_the_benchmarks_timing_hits_the_load(tiny_model_dir):
    server = routers._serve(tiny_model_dir, 1, argparse.Namespace(workers=2, concurrency=[8]))
    try:
        measured = asyncio.run(routers._streams(server.target, 8, 64))
        n, tokens = routers.failover_load([(1, 8, measured)], 64)
        assert n == 8 and tokens >= 64

        after = routers.router_failover(server, n, 64, when=lambda logs: all(log.done for log in logs))
        assert after["interrupted"] is False and after["errors"] == 0  # it killed an idle router
        assert AFTER_LOAD in routers.failover_row(1, after)
        wait_replaced(server.target, 1)

        hit = routers.router_failover(server, n, tokens)
        assert hit["interrupted"] is True, hit
        assert hit["errors"] == 0 and hit["tokens_per_s"] > 0
        assert AFTER_LOAD not in routers.failover_row(1, hit)
        wait_replaced(server.target, 2)
    finally:
        server.stop(grace_s=2.0)
