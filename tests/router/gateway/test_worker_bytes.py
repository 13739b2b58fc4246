"""Each worker's resident expert bytes and their dtype reach `client status` and the metrics."""

from __future__ import annotations

from prometheus_client import generate_latest

from cluster.actor_reports import MemberStatus, WorkerStats
from cluster.actor_state import MemberState
from deploy.cli.status_table import format_status
from protos.moecluster.v1 import inference_pb2 as pb
from router.gateway import convert
from router.gateway.metrics import GatewayMetrics

STATS = WorkerStats(
    slot=1,
    pid=7,
    state=MemberState.SERVING,
    device="cpu",
    generation=0,
    bytes_resident=3 * 2**20,
    expert_dtype="fp8",
    tokens_per_expert={1: {4: 2, 5: 0}},
    steps=3,
)


def test_worker_status_carries_the_expert_dtype_into_the_status_table():
    worker = convert.worker_status(1, STATS, MemberStatus(1, MemberState.SERVING), (1,))
    assert worker.expert_dtype == "fp8" and worker.bytes_resident == 3 * 2**20
    status = pb.GetClusterStatusResponse(workers=[worker], routers=[pb.RouterStatus()])
    info = pb.GetModelInfoResponse(name="m", moe_layers=[1], num_experts=8, experts_per_token=1)
    table = format_status(status, info, "SERVING")
    assert "3.0 MiB fp8" in table


def test_metrics_export_resident_expert_bytes_per_worker_and_dtype():
    metrics = GatewayMetrics()
    metrics.observe_worker_bytes({0: (1000, "fp8"), 1: (2000, "bfloat16")})
    text = generate_latest(metrics.registry).decode()
    assert 'moecluster_worker_expert_bytes{dtype="fp8",worker="0"} 1000.0' in text
    assert 'moecluster_worker_expert_bytes{dtype="bfloat16",worker="1"} 2000.0' in text
