"""The gateway's view of the cluster's health, published through the standard grpc.health.v1 service, and
the poller that keeps it (and the load metrics) current.

Two health names, as Kubernetes probes use them:
  ""                       liveness: SERVING while the gateway runs, unless the cluster gave up for good (a lost
                           expert could not be replaced): then NOT_SERVING, so the orchestrator restarts the pod.
  "moecluster.v1.Inference" readiness: SERVING while the router takes requests (weights loaded; a failover in
                           progress holds requests, it does not refuse them); NOT_SERVING while starting, after the
                           cluster gave up, and when draining.
"""

from __future__ import annotations

import asyncio
import logging

import ray
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from cluster.actor_reports import WorkerStats
from router.gateway.cluster_view import ClusterView
from router.gateway.convert import router_expert_tokens
from router.gateway.metrics import GatewayMetrics
from router.gateway.router_pool import RouterEntry, RouterPool

log = logging.getLogger(__name__)

LIVENESS = ""
READINESS = "moecluster.v1.Inference"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GatewayHealth:
    def __init__(self):
        self.servicer = health_aio.HealthServicer()
        self.ready = False
        self.live = True  # False for good once the cluster gave up (set_dead)
        self.draining = False
        self.reason = "the cluster is starting"

    async def start(self) -> None:
        await self.servicer.set(LIVENESS, SERVING)
        await self.servicer.set(READINESS, NOT_SERVING)

    async def set_ready(self, ready: bool, reason: str = "") -> None:
        if self.draining:  # final
            return
        if ready != self.ready:
            log.log(
                logging.INFO if ready else logging.ERROR,
                "readiness: %s%s",
                "SERVING" if ready else "NOT_SERVING",
                "" if ready else f" ({reason})",
            )
        self.ready, self.reason = ready, reason
        await self.servicer.set(READINESS, SERVING if ready else NOT_SERVING)

    async def set_dead(self, reason: str) -> None:
        """Liveness NOT_SERVING for good: restarting the process is the only way back."""
        if not self.draining:
            log.critical("liveness: NOT_SERVING (%s)", reason)
            self.ready, self.live, self.reason = False, False, reason
            await self.servicer.set(LIVENESS, NOT_SERVING)
            await self.servicer.set(READINESS, NOT_SERVING)

    async def drain(self) -> None:
        """Every name NOT_SERVING, for good (load balancers stop sending while in-flight work finishes)."""
        self.ready, self.draining, self.reason = False, True, "the server is shutting down"
        await self.servicer.enter_graceful_shutdown()


async def resolve(ref, timeout_s: float):
    """A Ray ObjectRef's value, or asyncio.TimeoutError."""
    return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s)


def first_line(error: BaseException) -> str:
    """Ray errors carry whole tracebacks; a status message needs one line."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class ClusterPoller:
    """Every `interval_s`: each router's health and engine stats (-> the router pool: readiness, load, the queue
    bound), the supervisor's verdict (-> liveness); every `expert_interval_s`: the first router's routed-token
    counts and failover counters (-> metrics). Polling keeps the Ray round trips off each request's path."""

    def __init__(
        self,
        view: ClusterView,
        pool: RouterPool,
        health: GatewayHealth,
        metrics: GatewayMetrics,
        interval_s: float = 0.25,
        expert_interval_s: float = 5.0,
        timeout_s: float = 10.0,
    ):
        self.view, self.pool, self.health, self.metrics = view, pool, health, metrics
        self.interval_s, self.expert_interval_s, self.timeout_s = interval_s, expert_interval_s, timeout_s

    async def check(self) -> tuple[bool, str]:
        """Ready now? At least one router takes requests."""
        self.pool.refresh_handles()
        await asyncio.gather(*(self._poll(entry) for entry in list(self.pool.entries.values())))
        return self.pool.ready, "" if self.pool.ready else self.pool.reason

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_experts = loop.time()
        while True:
            try:
                supervision = self.view.supervision()
                if supervision is not None and supervision.failure:
                    await self.health.set_dead(supervision.failure)
                await self.health.set_ready(*await self.check())
                polled = [e for e in self.pool.entries.values() if e.engine]
                self.metrics.observe_load([e.engine for e in polled], [e.index for e in polled])
                if loop.time() >= next_experts:
                    next_experts = loop.time() + self.expert_interval_s
                    await self._refresh_experts()
            except Exception:
                log.exception("cluster poll failed")
            await asyncio.sleep(self.interval_s)

    async def _poll(self, entry: RouterEntry) -> None:
        try:
            health, engine = await asyncio.gather(
                resolve(entry.handle.health.remote(), self.timeout_s),
                resolve(entry.handle.engine_stats.remote(), self.timeout_s),
            )
        except (ray.exceptions.RayError, asyncio.TimeoutError) as e:
            entry.ready, entry.reason, entry.engine = False, f"unreachable: {first_line(e)}", None
            return
        entry.ready, entry.engine = health.ready, engine
        entry.reason = health.failure or ("" if entry.ready else f"state {health.state.value}")

    async def _refresh_worker_bytes(self) -> None:
        """Each worker's resident expert bytes and dtype (-> metrics); a worker that does not answer is skipped."""
        refs = [w.stats.remote() for w in self.view.workers]
        answers = await asyncio.gather(*(resolve(r, self.timeout_s) for r in refs), return_exceptions=True)
        held = {s.slot: (s.bytes_resident, s.expert_dtype) for s in answers if isinstance(s, WorkerStats)}
        self.metrics.observe_worker_bytes(held)

    async def _refresh_experts(self) -> None:
        ready = [e for e in self.pool.entries.values() if e.ready]
        if not ready:
            return
        try:
            router = await resolve(ready[0].handle.stats.remote(), self.timeout_s)
        except (ray.exceptions.RayError, asyncio.TimeoutError) as e:
            log.warning("expert stats: %s", e)
            return
        self.metrics.observe_experts(router_expert_tokens(router))
        await self._refresh_worker_bytes()
        self.metrics.observe_expert_plane(router.channel, self.view.supervision())
