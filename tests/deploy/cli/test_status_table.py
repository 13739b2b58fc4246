"""What `client status` and Prometheus show of each router's prefix cache: hit rate, cached blocks, evictions."""

from __future__ import annotations

from prometheus_client import generate_latest

from cluster.actor_reports import RouterHealth, RouterStats
from cluster.actor_state import ChannelState
from deploy.cli.status_table import _router
from protos.moecluster.v1 import inference_pb2 as pb
from router.gateway.convert import router_status
from router.gateway.metrics import GatewayMetrics
from router.request.messages import EngineStats

ENGINE = EngineStats(
    running=1,
    kv_blocks_total=10,
    prefix_caching=True,
    prompt_tokens=400,
    cached_tokens=300,
    cached_blocks=12,
    evictions=3,
)
HEALTH = RouterHealth(ready=True, state=ChannelState.SERVING)
ROUTER = RouterStats(device="cpu", dtype="float32", steps=5)


def test_the_status_line_shows_the_prefix_cache_of_each_router():
    line = _router(router_status(1, HEALTH, ROUTER, ENGINE))
    assert "prefix cache hit 75.0% (300/400 prompt tokens), 12 blocks cached, 3 evicted" in line
    off = EngineStats(kv_blocks_total=10)
    assert "prefix cache off" in _router(router_status(0, HEALTH, ROUTER, off))


def test_the_router_status_carries_the_figures():
    status = router_status(1, HEALTH, ROUTER, ENGINE)
    assert isinstance(status, pb.RouterStatus)
    assert (status.prompt_tokens, status.cached_tokens, status.cached_blocks, status.cache_evictions) == (
        400,
        300,
        12,
        3,
    )
    assert status.prefix_hit_rate == 0.75 and status.prefix_caching


def test_prometheus_exports_the_prefix_cache_per_router():
    metrics = GatewayMetrics()
    metrics.observe_load([ENGINE, EngineStats()], [1, 0])
    text = generate_latest(metrics.registry).decode()
    for line in (
        'moecluster_prefix_cache_queries_total{router="1"} 400.0',
        'moecluster_prefix_cache_hits_total{router="1"} 300.0',
        'moecluster_prefix_cache_blocks{router="1"} 12.0',
        'moecluster_prefix_cache_evictions_total{router="1"} 3.0',
        'moecluster_prefix_cache_hit_ratio{router="1"} 0.75',
        'moecluster_prefix_cache_hits_total{router="0"} 0.0',
    ):
        assert line in text, line
