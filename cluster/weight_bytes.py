"""Bytes a routed expert takes once held, in either representation; torch-free, so that the memory plan
(deploy/plan.py) and a worker's check before loading count the same way."""

from __future__ import annotations

from cluster.config import ModelConfig

FP8_SCALE_BYTES = 4  # scales are held in fp32, one per output channel


def expert_bytes(cfg: ModelConfig, fp8: bool, dtype_bytes: int = 2) -> int:
    """One routed expert's gate, up and down weights: 1 byte per weight plus a scale per output channel (2I + D)
    in FP8, else `dtype_bytes` per weight."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    if fp8:
        return 3 * d * i + FP8_SCALE_BYTES * (2 * i + d)
    return 3 * d * i * dtype_bytes
