"""An ASGI app served by uvicorn on the gateway's own event loop (beside the grpc.aio server), with the gateway's
TLS certificate (and client CA: mutual TLS) when `gateway.tls` is set.

The socket is bound here, before uvicorn starts, so a port in use is an OSError naming it (uvicorn would exit the
process). `stop()` asks uvicorn to finish and waits a bounded time for it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

import uvicorn

from router.gateway.config import TlsConfig

log = logging.getLogger(__name__)
START_TIMEOUT_S = 10.0


class HttpServer:
    def __init__(self, app, host: str, port: int, tls: TlsConfig):
        self.app, self.host, self.requested_port, self.tls = app, host, port, tls
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls.enabled else "http"

    async def start(self) -> int:
        """Bind and serve; returns the port (the requested one, or a free one for 0)."""
        sock = _bind(self.host, self.requested_port)
        tls = self.tls
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            ssl_certfile=tls.cert_file,
            ssl_keyfile=tls.key_file,
            ssl_ca_certs=tls.client_ca_file,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls.client_ca_file else ssl.CERT_NONE,
        )
        server = uvicorn.Server(config)
        server.install_signal_handlers = lambda: None  # the serve process owns its signals (older uvicorn)
        self._server, self.port = server, sock.getsockname()[1]
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="http-front")
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while not server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"the HTTP server on {self.host}:{self.port} stopped while starting")
            if asyncio.get_running_loop().time() > deadline:
                raise OSError(f"the HTTP server on {self.host}:{self.port} did not start within {START_TIMEOUT_S}s")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self, grace_s: float = 2.0) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_s + 1)
        except asyncio.TimeoutError:
            log.warning("the HTTP server did not stop within %.0fs: closing its connections", grace_s + 1)
            self._server.force_exit = True
            self._task.cancel()
        self._server = self._task = None
        for task in asyncio.all_tasks():  # sse-starlette's watcher of this loop (one per loop), ended with the server
            if getattr(task.get_coro(), "__name__", "") == "_shutdown_watcher":
                task.cancel()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on connections accepted from a socket that says it is TCP
    # (as loop.create_server's are). Without it each event that follows another unacknowledged small write waits
    # for the client's delayed ACK: 40 ms more to the first token on a reused keep-alive connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen for HTTP on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock
