"""The gateway: a `grpc.aio` server in the `serve` process (never inside the router actor) that exposes
`moecluster.v1.Inference`, KServe v2 (`inference.GRPCInferenceService`), grpc.health.v1 and reflection, plus the
OpenAI-compatible HTTP API on `gateway.http_port` (uvicorn, on the same event loop). All three fronts share one
request path (generations.py) and reach the cluster through Ray handles.

Life: `start()` binds the port with readiness NOT_SERVING -> `attach(cluster view, model_dir)` once the
cluster is up (readiness follows the router's health from then on) -> `drain(grace_s)` (NOT_SERVING, new
generations refused, in-flight ones finish, the rest are aborted after the grace period) -> `stop()`.
Every method is a coroutine of one event loop; deploy/server.py runs that loop on a thread of its own.

Optional, off by default: TLS or mutual TLS on both ports (router/gateway/tls.py, `gateway.tls`) and API keys on
every call but health (router/gateway/auth.py, `gateway.api_keys_file` or $MOECLUSTER_API_KEYS).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import ipaddress
import logging
import os
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.kserve.v2 import grpc_predict_v2_pb2_grpc as kserve_grpc
from protos.moecluster.v1 import inference_pb2 as pb
from protos.moecluster.v1 import inference_pb2_grpc as pb_grpc
from router.gateway import tls
from router.gateway.affinity import Affinity
from router.gateway.api_keys import ApiKeys
from router.gateway.auth import ApiKeyInterceptor
from router.gateway.cluster_view import ClusterView
from router.gateway.config import GatewayConfig, MetricsConfig
from router.gateway.generations import AdmissionLimits, Backend, Generations
from router.gateway.health import ClusterPoller, GatewayHealth, resolve
from router.gateway.http_server import HttpServer
from router.gateway.kserve_service import OPEN_METHODS as KSERVE_OPEN
from router.gateway.kserve_service import SERVICE_NAME as KSERVE_SERVICE
from router.gateway.kserve_service import KServeService
from router.gateway.metrics import GatewayMetrics
from router.gateway.openai_api import OpenAIApi
from router.gateway.router_pool import RouterPool
from router.gateway.service import InferenceService
from router.images.decode import ImageLimits
from router.images.request import VisionPrompt
from router.request.tokenizer import Tokenizer

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name


class Gateway:
    def __init__(self, config: GatewayConfig, metrics: MetricsConfig = MetricsConfig()):
        self.config, self.metrics_config = config, metrics
        self.health = GatewayHealth()
        self.metrics = GatewayMetrics()
        self.service = Generations(  # the request path of every front
            AdmissionLimits(
                config.max_concurrent_streams,
                config.max_queued_requests,
                config.ray_timeout_s,
                config.request_timeout_s,
                config.router_failover_timeout_s,
            ),
            self.health,
            self.metrics,
        )
        self.inference = InferenceService(self.service)
        self.kserve = KServeService(self.service)
        self.api_keys = ApiKeys.load(config.api_keys_file, os.environ)  # read now: a bad key fails before binding
        self.port: int | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._http: HttpServer | None = None
        self._poller: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind and serve (readiness NOT_SERVING until `attach`); returns the port."""
        c = self.config
        server = grpc.aio.server(
            interceptors=[ApiKeyInterceptor(self.api_keys, open_methods=KSERVE_OPEN)] if self.api_keys else [],
            options=[
                ("grpc.max_receive_message_length", c.max_message_bytes),
                ("grpc.max_send_message_length", c.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_InferenceServicer_to_server(self.inference, server)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(self.kserve, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
        credentials = tls.server_credentials(c.tls)
        try:
            address = f"{c.host}:{c.port}"
            port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {c.host}:{c.port}: {e}") from None
        if not port:
            raise OSError(f"cannot listen on {c.host}:{c.port} (in use?)")
        await server.start()
        await self.health.start()
        self._server, self.port = server, port
        if c.http_port is not None:
            try:
                await self._start_http()
            except BaseException:
                await server.stop(0)
                raise
        self.inference.fronts = self._fronts()
        m = self.metrics_config
        if m.enabled:
            self.metrics_port = self.metrics.serve(m.port, m.host or c.host)
        keys = f"{len(self.api_keys)} API keys" if self.api_keys else "no API keys"
        log.info("gateway listening on %s:%d (%s, %s)", c.host, port, tls.describe(c.tls), keys)
        for front in self.inference.fronts:
            log.info("front %s on %s://%s", front.protocol, front.transport, front.address)
        if not self.api_keys and not c.tls.client_ca_file and not _loopback(c.host):
            log.warning(
                "the gateway on %s accepts every client that can reach it: set gateway.api_keys_file or "
                "gateway.tls.client_ca_file to require a key or a client certificate",
                c.host,
            )
        return port

    async def _start_http(self) -> None:
        api = OpenAIApi(self.service, self.api_keys)
        self._http = HttpServer(api.app, self.config.host, self.config.http_port, self.config.tls)
        self.http_port = await self._http.start()

    def _fronts(self) -> list[pb.Front]:
        c = self.config
        grpc_transport = "grpcs" if c.tls.enabled else "grpc"
        fronts = [
            pb.Front(protocol=SERVICE_NAME, address=f"{c.host}:{self.port}", transport=grpc_transport),
            pb.Front(protocol=KSERVE_SERVICE, address=f"{c.host}:{self.port}", transport=grpc_transport),
        ]
        if self._http is not None:
            fronts.append(
                pb.Front(protocol="openai", address=f"{c.host}:{self.http_port}", transport=self._http.scheme)
            )
        return fronts

    async def attach(self, view: ClusterView, model_dir: str) -> None:
        """Serve through this cluster: readiness follows its routers' health from now on (SERVING while at least
        one takes requests)."""
        info = await resolve(view.routers[0].model_info.remote(), self.config.ray_timeout_s)
        await asyncio.to_thread(importlib.import_module, "xgrammar")  # constraints are parsed at the door: load
        # it here, off the event loop, not on the first constrained request
        pool = router_pool(view, info, self.config.routing)
        poller = ClusterPoller(
            view,
            pool,
            self.health,
            self.metrics,
            self.config.poll_interval_s,
            self.config.expert_stats_interval_s,
            self.config.ray_timeout_s,
        )
        vision = gateway_vision(info.vision, self.config)
        self.service.backend = Backend(pool, view, info, Tokenizer.from_dir(model_dir), poller, vision)
        await self.health.set_ready(*await poller.check())
        self._poller = asyncio.create_task(poller.run(), name="cluster-poller")

    def set_limits(self, max_concurrent_streams: int | None = None, max_queued_requests: int | None = None) -> None:
        """Change the admission limits while serving; requests arriving from now on see the new ones. A plain
        attribute swap, so any thread may call it."""
        changes = {
            k: v
            for k, v in (
                ("max_concurrent_streams", max_concurrent_streams),
                ("max_queued_requests", max_queued_requests),
            )
            if v is not None
        }
        self.service.limits = dataclasses.replace(self.service.limits, **changes)

    async def drain(self, grace_s: float | None = None) -> int:
        """NOT_SERVING; wait up to `grace_s` for open streams to finish, then abort the rest in the engine.
        Returns how many were aborted."""
        grace_s = self.config.drain_grace_s if grace_s is None else grace_s
        await self.health.drain()
        open_streams = len(self.service.streams)
        log.info("draining: %d streams open, grace %.1fs", open_streams, grace_s)
        if not await self._streams_closed(time.monotonic() + grace_s):
            aborted = self.service.abort_all()
            log.warning("drain grace over: aborting %d requests", len(aborted))
            await self._streams_closed(time.monotonic() + 5.0)  # each ends with a Complete(ABORT)
            return len(aborted)
        return 0

    async def _streams_closed(self, deadline: float) -> bool:
        while self.service.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.service.streams

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        if self._http is not None:
            await self._http.stop(grace_s)
            self._http = None
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        self.metrics.close()


def router_pool(view: ClusterView, info: dict, routing: str) -> RouterPool:
    """The routers to spread requests over: by cache affinity when `routing` asks for it and the routers cache
    prefixes (RouterActor.model_info()), else by load alone."""
    affinity = routing == "cache_aware" and info.prefix_caching
    return RouterPool(view, Affinity() if affinity else None)


def gateway_vision(vision: VisionPrompt | None, c: GatewayConfig) -> VisionPrompt | None:
    """The model's image tokens (from the router) with this gateway's image limits."""
    if vision is None:
        return None
    limits = ImageLimits(max_bytes=c.max_image_bytes, max_pixels=c.max_image_pixels)
    processor = dataclasses.replace(vision.processor, limits=limits)
    return dataclasses.replace(vision, processor=processor, max_images=c.max_images_per_request)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
