"""What each actor of a deployment is started with: its constructor's arguments and its Ray resource request, as
plain data built from the deployment's settings. One place, so every setting reaches its actor by one path (and
tests/deploy/test_settings_reach.py can check that each one does without starting Ray)."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.expert_map import ExpertMap
from deploy.cluster_config import ClusterConfig
from deploy.ray_runtime import bundles
from deploy.replacement_policy import ReplacementPolicy
from router.experts.settings import ChannelSettings
from router.images.features import VisionSettings

WORKER_CONCURRENCY = 16  # per worker: one loop call per router, plus fence, ping, stats, lifetime, loading
ROUTER_CONCURRENCY = 10_000  # an async actor: one call per open stream
ENCODER_CONCURRENCY = 1_000  # an async actor: encodes queue inside it (one at a time), pings answer meanwhile


@dataclass(frozen=True)
class ActorSpec:
    bundle: int  # its placement-group bundle: router r is bundle r, worker slot w is bundle routers + w,
    # vision encoder e is bundle routers + workers + e
    resources: dict  # num_cpus, num_gpus, memory (Ray's actor options)
    concurrency: int
    kwargs: dict  # the actor class's constructor arguments


def router_spec(spec, index: int, expert_map: ExpertMap | None, bind_host: str | None) -> ActorSpec:
    """`spec` is a DeploymentSpec."""
    c = spec.cluster
    kwargs = dict(
        model_dir=spec.model_dir,
        expert_map=expert_map,
        device=c.device,
        dtype=spec.dtype,
        engine_config=spec.engine,
        model_name=spec.model_name,
        channel=ChannelSettings(hang_timeout_s=c.hang_timeout_s),
        collective_timeout_s=c.collective_timeout_s,
        bind_host=bind_host,
        router_id=index,
        log=spec.log,
        vision=VisionSettings(c.encoders, c.vision_cache_memory, c.hang_timeout_s, wait_s=c.startup_timeout_s),
        expert_dtype=spec.expert_dtype,
    )
    return ActorSpec(index, _resources(c, index), ROUTER_CONCURRENCY, kwargs)


def worker_spec(spec, slot: int, expert_map: ExpertMap, bind_host: str | None, load_delay_s: float = 0.0) -> ActorSpec:
    c = spec.cluster
    kwargs = dict(
        model_dir=spec.model_dir,
        slot=slot,
        expert_map=expert_map,
        device=c.device,
        dtype=spec.dtype,
        expert_dtype=spec.expert_dtype,
        bind_host=bind_host,
        load_delay_s=load_delay_s,
        log=spec.log,
    )
    return ActorSpec(c.routers + slot, _resources(c, c.routers + slot), WORKER_CONCURRENCY, kwargs)


def encoder_spec(spec, index: int) -> ActorSpec:
    c = spec.cluster
    kwargs = dict(model_dir=spec.model_dir, index=index, device=c.device, dtype=spec.dtype, log=spec.log)
    bundle = c.routers + c.workers + index
    return ActorSpec(bundle, _resources(c, bundle), ENCODER_CONCURRENCY, kwargs)


def supervisor_settings(c: ClusterConfig) -> dict:
    """The Supervisor's keyword arguments that come from the settings."""
    return dict(
        policy=ReplacementPolicy(c.max_replacement_failures, c.replacement_window_s),
        rebalance_interval_s=c.rebalance_interval_s,
        extra_copies_per_worker=c.redundant_experts_per_worker,
        min_copies=c.expert_replicas,
        load_timeout_s=c.startup_timeout_s,
    )


def _resources(c: ClusterConfig, bundle: int) -> dict:
    res = bundles(c)[bundle]
    return dict(num_cpus=res["CPU"], num_gpus=res.get("GPU", 0), memory=res.get("memory"))
