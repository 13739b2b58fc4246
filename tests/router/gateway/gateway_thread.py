"""A Gateway on an event loop thread of its own with no cluster attached: enough to test what stands in front of
the service (TLS, API keys). It answers health (liveness SERVING, readiness NOT_SERVING) and refuses the Inference
calls with UNAVAILABLE ("the cluster is not ready") once a call gets past authentication."""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager

from deploy.config import parse_serve_config
from router.gateway.server import Gateway


@contextmanager
def running_gateway(gateway_section: dict):
    """Yields the Gateway (its `port` bound on 127.0.0.1) built from a `gateway:` section of the serve config."""
    config = parse_serve_config(
        {"gateway": {"host": "127.0.0.1", "port": 0, "http_port": 0, **gateway_section}}, "test config"
    )
    gateway = Gateway(config.gateway, config.metrics)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-gateway", daemon=True)
    thread.start()
    run = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(30)  # noqa: E731
    try:
        run(gateway.start())
        yield gateway
    finally:
        run(gateway.stop(grace_s=0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
