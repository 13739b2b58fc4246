"""From the one YAML serve configuration (deploy/config.py) to what the server is built from: the checkpoint
directory (the embedded tiny model when none is given), the cluster, the engine and the gateway settings."""

from __future__ import annotations

from collections.abc import Mapping

from deploy.config import ServeConfig
from deploy.server import ServerConfig
from router.engine import EngineConfig
from router.gateway import GatewayConfig


def resolve_model_dir(cfg: ServeConfig, env: Mapping[str, str]) -> str:
    if cfg.model.path:
        return cfg.model.path
    from deploy.model_cache import cache_dir, tiny_model

    return str(tiny_model(cache_dir(env), cfg.model.tiny_preset))


def server_config_from(cfg: ServeConfig, env: Mapping[str, str]) -> ServerConfig:
    model_dir = resolve_model_dir(cfg, env)
    s, g, c = cfg.scheduler, cfg.gateway, cfg.cluster
    engine = EngineConfig(max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens,
                          max_model_len=s.max_model_len, block_size=s.block_size, kv_cache_bytes=s.kv_cache_memory)
    gateway = GatewayConfig(host=g.host, port=g.port, max_concurrent_streams=g.max_concurrent_streams,
                            max_queued_requests=g.max_queued_requests, max_message_bytes=g.max_message_bytes,
                            drain_grace_s=g.drain_grace_s,
                            metrics_port=cfg.metrics.port if cfg.metrics.enabled else None)
    placement = c.placement
    if isinstance(placement, Mapping):
        placement = {layer: [list(group) for group in groups] for layer, groups in placement.items()}
    return ServerConfig(model_dir, c.workers, device=c.device, dtype=cfg.model.dtype, placement=placement,
                        ray_address=c.ray_address, model_name=cfg.model.served_name,
                        engine=engine, gateway=gateway)

