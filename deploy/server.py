"""A whole serving process as one object: the gRPC gateway (on an event loop thread of its own) in front of a
deployment of actors on Ray. Used by `moecluster serve`, the Ray job, the demo, the gRPC benchmark and the tests.

  server = Server(serve_config, model_dir)
  server.start()          # = start_gateway() (port bound, readiness NOT_SERVING) + start_cluster() (SERVING)
  ... clients use server.target ...
  server.stop()           # drain (grace period), abort the rest, stop the gateway, stop the cluster
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

from deploy import private_ray
from deploy.config import ServeConfig
from deploy.deployment import Deployment, DeploymentSpec
from deploy.tiny.cache import model_dir_for
from router.gateway.server import Gateway

log = logging.getLogger(__name__)


class Server:
    def __init__(self, config: ServeConfig, show_progress: bool = True):
        """Serves `config.model.path`, or the embedded tiny model (made once in the cache directory that
        $MOECLUSTER_CACHE, $XDG_CACHE_HOME or ~/.cache names) when the config names no checkpoint."""
        self.config, self.show_progress = config, show_progress
        self.model_dir = model_dir_for(config.model.path, config.model.tiny_preset, os.environ)
        self.gateway = Gateway(config.gateway, config.metrics)
        self.cluster: Deployment | None = None
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def port(self) -> int:
        assert self.gateway.port is not None, "start_gateway() first"
        return self.gateway.port

    @property
    def target(self) -> str:
        host = self.config.gateway.host
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{self.port}"

    @property
    def model_name(self) -> str:
        backend = self.gateway.service.backend
        return backend.info.name if backend else ""

    def start(self) -> Server:
        try:
            self.start_gateway()
            self.start_cluster()
        except BaseException:
            self.stop(drain=False)
            raise
        return self

    def start_gateway(self) -> int:
        self._thread = threading.Thread(target=self._loop.run_forever, name="gateway-loop", daemon=True)
        self._thread.start()
        return self._run(self.gateway.start())

    def start_cluster(self) -> None:
        """Start the router and workers (blocking, in this thread: Ray's driver lives here) and attach them."""
        spec = DeploymentSpec.from_serve(self.config, self.model_dir, self.show_progress)
        self.cluster = Deployment.start(spec, on_status=self._starting)
        self._run(self.gateway.attach(self.cluster, self.model_dir))
        log.info("serving %s on %s", self.model_name, self.target)

    def _starting(self, message: str) -> None:
        """What the start-up waits for, as the readiness reason (health checks and status say it)."""
        asyncio.run_coroutine_threadsafe(self.gateway.health.set_ready(False, f"starting: {message}"), self._loop)

    def drain(self, grace_s: float | None = None) -> int:
        """Readiness NOT_SERVING, wait for open streams (up to the grace period), abort the rest."""
        grace = self.config.gateway.drain_grace_s if grace_s is None else grace_s
        return self._run(self.gateway.drain(grace), timeout=grace + 30)

    def stop(self, drain: bool = True, grace_s: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            if self._thread is not None:
                if drain:
                    self.drain(grace_s)
                self._run(self.gateway.stop())
        finally:
            if self.cluster is not None:
                self._stop_cluster()
            if self._thread is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10)
                if not self._loop.is_running():
                    self._loop.close()

    def _stop_cluster(self, timeout_s: float = 45.0) -> None:
        """Deployment.stop, bounded: with the raylet gone (Ctrl-C in a terminal signals Ray's daemons too) removing
        the placement group never returns; then shut Ray down directly."""
        stopper = threading.Thread(target=self.cluster.stop, name="cluster-stop", daemon=True)
        stopper.start()
        stopper.join(timeout_s)
        if stopper.is_alive():
            log.error("the cluster did not stop within %.0fs (is the raylet gone?); shutting Ray down", timeout_s)
            if self.cluster.owns_ray:
                private_ray.shutdown()

    def _run(self, coro, timeout: float | None = 300):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
