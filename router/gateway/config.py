"""The gateway's settings: the `gateway:` and `metrics:` sections of the serve config, used as they are."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.settings import Settings, byte_size, flag, integer, number, optional, setting, text


@dataclass(frozen=True)
class GatewayConfig(Settings):
    host: str = setting("127.0.0.1", text)  # 0.0.0.0: every interface (in a container or pod)
    port: int = setting(50051, integer(0, 65535))  # 0: any free port (see Gateway.port)
    max_concurrent_streams: int = setting(256, integer(1))  # open Generate streams; beyond: RESOURCE_EXHAUSTED
    max_queued_requests: int = setting(1024, integer(0))  # waiting in the engine; beyond: RESOURCE_EXHAUSTED; 0: off
    max_message_bytes: int = setting(4 * 2**20, byte_size(hi=2**31 - 1))  # each way (gRPC limits are int32)
    drain_grace_s: float = setting(30.0, number(0))  # on shutdown, open streams get this long to finish
    request_timeout_s: float | None = setting(None, optional(number(0, above=True)))  # deadline for a Generate
    # whose client set none (a client's own, shorter deadline still wins); None: none
    poll_interval_s: float = setting(0.25, number(0, above=True))  # router health and load (the queue bound uses it)
    expert_stats_interval_s: float = setting(5.0, number(0, above=True))  # tokens per expert, for metrics
    ray_timeout_s: float = setting(10.0, number(0, above=True))  # control calls to the actors (never generations)


@dataclass(frozen=True)
class MetricsConfig(Settings):
    enabled: bool = setting(False, flag)
    port: int = setting(9090, integer(0, 65535))  # Prometheus text format on /metrics; 0: any free port
    host: str | None = setting(None, optional(text))  # None: the gateway's host
