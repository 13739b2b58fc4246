"""How the client libraries (protos/client.py, protos/async_client.py) prove who they are to a gateway that asks:
TLS channel credentials (the CA that signed the server's certificate; for mutual TLS also the client's own
certificate and key), and an API key sent as the metadata `authorization: Bearer <key>` on every call.

Each TLS argument is a path (str or os.PathLike) or the PEM content itself (bytes).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import grpc

Pem = str | os.PathLike | bytes
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


def channel_credentials(
    tls: bool = False, tls_ca: Pem | None = None, tls_cert: Pem | None = None, tls_key: Pem | None = None
) -> grpc.ChannelCredentials | None:
    """None for a plaintext channel: no TLS argument given and `tls` false. `tls` alone: TLS verified against the
    system's root certificates."""
    if (tls_cert is None) != (tls_key is None):
        given, missing = ("tls_cert", "tls_key") if tls_key is None else ("tls_key", "tls_cert")
        raise ValueError(f"{given} is set but {missing} is not: a client certificate needs its key (mutual TLS)")
    if not (tls or tls_ca is not None or tls_cert is not None):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(tls_ca, "tls_ca"),
        private_key=_pem(tls_key, "tls_key"),
        certificate_chain=_pem(tls_cert, "tls_cert"),
    )


def call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata every call carries: the API key, if any. A bad key is refused here, without repeating it."""
    if api_key is None:
        return ()
    if not _VISIBLE_ASCII.fullmatch(api_key):
        raise ValueError("api_key: expected visible ASCII characters without spaces (is there a newline at its end?)")
    return (("authorization", f"Bearer {api_key}"),)


def _pem(source: Pem | None, name: str) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as e:
        raise ValueError(f"{name}: cannot read {os.fspath(source)!r}: {e.strerror or e}") from None
