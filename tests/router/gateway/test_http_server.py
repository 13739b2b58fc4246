"""The HTTP front's server (router/gateway/http_server.py) on its own: every accepted connection has TCP_NODELAY, so
a stream's events are not held for the client's delayed ACK (40 ms per event on a reused connection), and a port in
use is an OSError naming it."""

from __future__ import annotations

import asyncio
import socket

import pytest

from router.gateway.config import TlsConfig
from router.gateway.http_server import HttpServer


async def _app(scope, receive, send):
    """200 "ok" (the connection stays open after it: HTTP/1.1 keep-alive)."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def test_accepted_connections_have_tcp_nodelay():
    async def main():
        server = HttpServer(_app, "127.0.0.1", 0, TlsConfig())
        port = await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            assert b"200" in await asyncio.wait_for(reader.readline(), 10)
            connections = server._server.server_state.connections
            (connection,) = connections
            sock = connection.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            writer.close()
        finally:
            await server.stop()

    asyncio.run(main())


def test_a_port_in_use_is_an_oserror_naming_it():
    async def main():
        first = HttpServer(_app, "127.0.0.1", 0, TlsConfig())
        port = await first.start()
        try:
            with pytest.raises(OSError, match=f"cannot listen for HTTP on 127.0.0.1:{port}"):
                await HttpServer(_app, "127.0.0.1", port, TlsConfig()).start()
        finally:
            await first.stop()

    asyncio.run(main())
