"""The gateway's settings: the `gateway:` and `metrics:` sections of the serve config, used as they are.

Security (all off by default; see README "Security"): `gateway.tls` turns on TLS, and mutual TLS with a client CA;
`gateway.api_keys_file` (and $MOECLUSTER_API_KEYS, read when the gateway starts) turns on API keys. The files are
read and checked when the config loads, so a wrong path or a key that does not match its certificate fails at once,
naming the key.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from cluster.settings import (
    Check,
    Invalid,
    SettingError,
    Settings,
    byte_size,
    flag,
    integer,
    number,
    optional,
    section,
    setting,
    text,
)
from router.gateway.api_keys import ApiKeyError, read_key_file
from router.images.header import PILLOW_MAX_PIXELS

_PEM_LABEL = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----")


def pem_file(what: str, accepts) -> Check:
    """A check: a readable PEM file holding a block whose label `accepts` (e.g. CERTIFICATE)."""

    def check(v):
        path = text(v)
        try:
            labels = _PEM_LABEL.findall(Path(path).read_text(errors="replace"))
        except OSError as e:
            raise Invalid(f"cannot read {path!r}: {e.strerror or e}") from None
        if "ENCRYPTED PRIVATE KEY" in labels:
            raise Invalid(f"{path!r} holds an encrypted key; gRPC needs it unencrypted (keep the file mode 0600)")
        if not any(accepts(label) for label in labels):
            found = f"found {', '.join(sorted(set(labels)))}" if labels else "found no PEM block"
            raise Invalid(f"expected a PEM file with {what}, got {path!r} ({found})")
        return path

    return check


CERTIFICATES = pem_file("a CERTIFICATE", lambda label: label == "CERTIFICATE")
PRIVATE_KEY = pem_file("a PRIVATE KEY", lambda label: label.endswith("PRIVATE KEY"))


def key_file(v):
    path = text(v)
    try:
        read_key_file(path)
    except ApiKeyError as e:
        raise Invalid(str(e)) from None
    return path


@dataclass(frozen=True)
class TlsConfig(Settings):
    """`gateway.tls`: TLS is on when cert_file is set; mutual TLS when client_ca_file is set too."""

    cert_file: str | None = setting(None, optional(CERTIFICATES))  # the server's certificate (chain), PEM
    key_file: str | None = setting(None, optional(PRIVATE_KEY))  # its private key, PEM, unencrypted
    client_ca_file: str | None = setting(None, optional(CERTIFICATES))  # mutual TLS: clients must present a
    # certificate signed by one of these CAs; None: any client may connect (then use API keys)

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    def check_across(self) -> None:
        if self.key_file is None and self.cert_file is not None:
            raise SettingError("key_file", "cert_file is set: expected the path of its private key too")
        if self.cert_file is None and self.key_file is not None:
            raise SettingError("cert_file", "key_file is set: expected the path of its certificate too")
        if self.client_ca_file is not None and self.cert_file is None:
            raise SettingError(
                "client_ca_file", "mutual TLS needs TLS first: expected cert_file and key_file (the server's own)"
            )
        if self.cert_file is not None:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert_file, self.key_file)
            except ssl.SSLError as e:
                raise SettingError("key_file", f"does not match cert_file ({e.reason or e})") from None


@dataclass(frozen=True)
class GatewayConfig(Settings):
    host: str = setting("127.0.0.1", text)  # 0.0.0.0: every interface (in a container or pod)
    port: int = setting(50051, integer(0, 65535))  # 0: any free port (see Gateway.port); moecluster.v1 and
    # KServe v2 gRPC (inference.GRPCInferenceService) both listen here
    http_port: int | None = setting(8000, optional(integer(0, 65535)))  # the OpenAI-compatible HTTP API, on `host`
    # with the same TLS and API keys; 0: any free port (see Gateway.http_port); None: no HTTP front
    max_concurrent_streams: int = setting(256, integer(1))  # open Generate streams; beyond: RESOURCE_EXHAUSTED
    max_queued_requests: int = setting(1024, integer(0))  # waiting in the engine; beyond: RESOURCE_EXHAUSTED; 0: off
    max_message_bytes: int = setting(32 * 2**20, byte_size(hi=2**31 - 1))  # each way (gRPC limits are int32); a
    # request's images count too, so it bounds the bytes of all its images together
    max_image_bytes: int = setting(20 * 2**20, byte_size())  # one image's encoded bytes; beyond: INVALID_ARGUMENT
    max_image_pixels: int = setting(50_000_000, integer(1, PILLOW_MAX_PIXELS))  # width * height, read from the
    # header before anything is decoded (decompression bombs); beyond: INVALID_ARGUMENT
    max_images_per_request: int = setting(8, integer(0))  # beyond: INVALID_ARGUMENT; 0: no images at all
    drain_grace_s: float = setting(30.0, number(0))  # on shutdown, open streams get this long to finish
    request_timeout_s: float | None = setting(None, optional(number(0, above=True)))  # deadline for a Generate
    # whose client set none (a client's own, shorter deadline still wins); None: none
    poll_interval_s: float = setting(0.25, number(0, above=True))  # router health and load (the queue bound uses it)
    expert_stats_interval_s: float = setting(5.0, number(0, above=True))  # tokens per expert, for metrics
    ray_timeout_s: float = setting(10.0, number(0, above=True))  # control calls to the actors (never generations)
    router_failover_timeout_s: float = setting(600.0, number(0, above=True))  # a stream whose router died waits
    # this long for a router to continue on (with one router: for its replacement, which loads the weights)
    api_keys_file: str | None = setting(None, optional(key_file))  # one key per line; every call but health must
    # carry `authorization: Bearer <key>` (also $MOECLUSTER_API_KEYS); None and no variable: no API keys
    tls: TlsConfig = section(TlsConfig)


@dataclass(frozen=True)
class MetricsConfig(Settings):
    enabled: bool = setting(False, flag)
    port: int = setting(9090, integer(0, 65535))  # Prometheus text format on /metrics; 0: any free port
    host: str | None = setting(None, optional(text))  # None: the gateway's host
