"""The gateway's Prometheus metrics, in a registry of their own (one per server, so a process can run several).

Request-path metrics are recorded by the gateway as requests flow; load metrics (queue depth, running, KV
usage, tokens per expert) are copied from the cluster's stats by the gateway's poller.
"""

from __future__ import annotations

import functools
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from cluster.actor_reports import ChannelStats, SupervisorStatus
from cluster.actor_state import ActorKind
from cluster.failover_buckets import STALL_BUCKETS_S

log = logging.getLogger(__name__)

# Time to first token spans queueing and prefill; inter-token latency is one decode step.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class GatewayMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "moecluster_requests",
            "Generate requests by outcome: length, stop, abort, "
            "cancelled, error, invalid_argument, not_found, resource_exhausted, unavailable",
            ["outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter("moecluster_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("moecluster_completion_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "moecluster_time_to_first_token_seconds",
            "From request arrival to its first token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "moecluster_inter_token_latency_seconds",
            "Between consecutive tokens of a stream",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        # the same per front: moecluster (moecluster.v1), kserve (KServe v2 gRPC), openai (the HTTP API)
        self.front_requests = Counter(
            "moecluster_front_requests",
            "Generation requests per front and outcome (the outcomes of moecluster_requests)",
            ["front", "outcome"],
            registry=r,
        )
        self.front_seconds = Histogram(
            "moecluster_front_request_seconds",
            "From arrival to the last token of a finished request, per front",
            ["front"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.front_ttft = Histogram(
            "moecluster_front_time_to_first_token_seconds",
            "From arrival to the first token, per front",
            ["front"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.router_failovers = Counter(
            "moecluster_router_failovers",
            "Streams that lost their router and continued on another (or its replacement), per front",
            ["front"],
            registry=r,
        )
        self.active_streams = Gauge("moecluster_active_streams", "Generate streams open on the gateway", registry=r)
        self.waiting = Gauge("moecluster_queue_depth", "Requests waiting in the engine", registry=r)
        self.running = Gauge("moecluster_running_requests", "Requests in the engine's running batch", registry=r)
        self.kv_usage = Gauge("moecluster_kv_cache_usage_ratio", "KV cache blocks used / total", registry=r)
        self.tokens_per_s = Gauge("moecluster_generation_tokens_per_second", "Over the last 10 s", registry=r)
        labelled = functools.partial(Gauge, registry=r)
        self.expert_tokens = labelled(
            "moecluster_expert_tokens", "Tokens routed to each expert since its worker started", ["layer", "expert"]
        )
        self.prefix_cache = _PrefixCacheCollector()
        r.register(self.prefix_cache)
        self.worker_expert_bytes = labelled(
            "moecluster_worker_expert_bytes",
            "Bytes of routed-expert weights (and FP8 scales) each worker holds, by the dtype they are held in",
            ["worker", "dtype"],
        )
        self.expert_plane = _ExpertPlaneCollector()
        r.register(self.expert_plane)
        self._http = None

    def serve(self, port: int, host: str) -> int:
        """Expose /metrics on `port` (0: any free port); returns the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        port = self._http.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, port)
        return port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def observe_load(self, engines: list, routers: list[int] | None = None) -> None:
        """Summed over the routers' engines (KV usage: over all their blocks); the prefix cache per router
        (`routers`: the index of each engine's router; default 0, 1, ...)."""
        self.prefix_cache.engines = list(zip(routers or range(len(engines)), engines))
        used, total = sum(e.kv_blocks_used for e in engines), sum(e.kv_blocks_total for e in engines)
        self.waiting.set(sum(e.waiting for e in engines))
        self.running.set(sum(e.running for e in engines))
        self.kv_usage.set(used / total if total else 0.0)
        self.tokens_per_s.set(sum(e.tokens_per_s for e in engines))

    def observe_expert_plane(self, channel: ChannelStats | None, supervision: SupervisorStatus | None) -> None:
        self.expert_plane.channel, self.expert_plane.supervision = channel, supervision

    def observe_worker_bytes(self, held: dict[int, tuple[int, str]]) -> None:
        """worker slot -> (resident expert bytes, dtype), as the workers last answered."""
        self.worker_expert_bytes.clear()
        for slot, (nbytes, dtype) in held.items():
            self.worker_expert_bytes.labels(worker=str(slot), dtype=dtype).set(nbytes)

    def observe_experts(self, tokens: dict[tuple[int, int], int]) -> None:
        for (layer, expert), count in tokens.items():
            self.expert_tokens.labels(layer=str(layer), expert=str(expert)).set(count)


class _PrefixCacheCollector:
    """Each router's prefix cache as last polled: prompt tokens, those served from the cache, cached blocks and
    evictions (the router counts; this copies its running totals)."""

    def __init__(self):
        self.engines: list = []  # (router index, EngineStats)

    def collect(self):
        families = (
            (CounterMetricFamily, "moecluster_prefix_cache_queries", "Prompt tokens of admitted requests"),
            (CounterMetricFamily, "moecluster_prefix_cache_hits", "Prompt tokens served from the prefix cache"),
            (GaugeMetricFamily, "moecluster_prefix_cache_blocks", "KV blocks named by a hash, held or kept"),
            (CounterMetricFamily, "moecluster_prefix_cache_evictions", "Cached KV blocks taken for new content"),
            (GaugeMetricFamily, "moecluster_prefix_cache_hit_ratio", "Prompt tokens from the cache / prompt tokens"),
        )
        values = ("prompt_tokens", "cached_tokens", "cached_blocks", "evictions", "hit_rate")
        for (kind, name, documentation), field in zip(families, values):
            family = kind(name, documentation, labels=["router"])
            for index, engine in self.engines:
                family.add_metric([str(index)], getattr(engine, field))
            yield family


class _ExpertPlaneCollector:
    """Failover, replacement and rebalancing figures, counted by the router and the supervisor and exported as
    they were last polled (Prometheus counters that live elsewhere: this copies their running totals)."""

    def __init__(self):
        self.channel: ChannelStats | None = None
        self.supervision: SupervisorStatus | None = None

    def collect(self):
        channel, supervision = self.channel, self.supervision
        if channel is None:
            return
        counters = (supervision or SupervisorStatus()).counters
        yield _counter(
            "moecluster_failovers",
            "Steps that failed on a lost worker and were replayed after regrouping",
            channel.failovers,
        )
        yield _counter("moecluster_replayed_steps", "Forward passes run again after a failover", channel.replayed_steps)
        yield _counter(
            "moecluster_worker_deaths",
            "Expert workers that died or were killed as hung",
            counters.died(ActorKind.WORKER),
        )
        replacements = CounterMetricFamily(
            "moecluster_worker_replacements", "Replacement workers by outcome", labels=["outcome"]
        )
        replacements.add_metric(["started"], counters.replacements_started)
        replacements.add_metric(["succeeded"], counters.replacements_succeeded)
        replacements.add_metric(["failed"], counters.replacements_failed)
        yield replacements
        yield _counter("moecluster_rebalances", "Expert maps applied by rebalancing", counters.rebalances)
        buckets, running = [], 0
        for bound, count in zip([*map(str, STALL_BUCKETS_S), "+Inf"], channel.stall_buckets):
            running += count
            buckets.append((bound, running))
        yield HistogramMetricFamily(
            "moecluster_failover_stall_seconds",
            "From a step's failure to the replayed step's start (fence, settle, hold, regroup)",
            buckets=buckets,
            sum_value=channel.stall_sum_s,
        )
        yield GaugeMetricFamily(
            "moecluster_expert_map_generation", "The expert map in use", value=channel.map_generation
        )
        yield GaugeMetricFamily(
            "moecluster_router_group_epoch", "Epoch of the router's group with the workers", value=channel.epoch
        )


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
