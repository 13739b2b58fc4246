"""What a router says about the model it serves (RouterActor.model_info()): what the gateway needs to validate
requests (limits, generation defaults, image tokens) and to answer GetModelInfo. Built by the router actor, read
by field by the gateway; it pickles across Ray. Every field has a default, so a new field breaks no reader."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from router.images.request import VisionPrompt
from router.request.prepare import Limits


@dataclass(frozen=True)
class ModelInfo:
    name: str = ""
    architecture: str = ""
    context_length: int = 0
    vocab_size: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    num_layers: int = 0
    moe_layers: tuple[int, ...] = ()
    hidden_size: int = 0
    limits: Limits = Limits(0, 0, 0)
    generation_defaults: dict[str, Any] = field(default_factory=dict)  # generation_config.json's sampling fields
    eos_token_ids: tuple[int, ...] = ()
    kv_token_capacity: int = 0
    block_size: int = 0  # the paged KV cache's block: the gateway hashes prompts in these (cache-affinity routing)
    prefix_caching: bool = False  # whether the router reuses cached prefixes
    kv_bytes_per_token: int = 0
    dtype: str = ""
    device: str = ""
    workers: int = 0  # expert workers (0: the router holds every expert)
    vision: VisionPrompt | None = None  # the model's image tokens, tile size and tokens per tile; None: no images
