"""The gateway's TLS: server credentials from `gateway.tls` (router/gateway/config.py checked the files when the
config loaded). Mutual TLS when a client CA is set: a client without a certificate signed by it fails the
handshake, before any RPC."""

from __future__ import annotations

from pathlib import Path

import grpc

from router.gateway.config import TlsConfig


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """None when TLS is off (no cert_file)."""
    if not tls.enabled:
        return None
    client_ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def describe(tls: TlsConfig) -> str:
    if not tls.enabled:
        return "plaintext"
    return "mutual TLS" if tls.client_ca_file else "TLS"
