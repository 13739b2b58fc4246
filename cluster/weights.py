"""Builds the router-side model and expert shards from a checkpoint, reading only what each side holds.

Router side: every parameter of `Llama4ForCausalLM` is read under its own name. Expert side: per MoE layer,
only the requested experts' rows of the fused `experts.gate_up_proj` [E, D, 2I] / `experts.down_proj`
[E, I, D] tensors, or the per-expert unfused tensors of FP8-style checkpoints
(`experts.{e}.gate_proj.weight` [I, D], ...), transposed to the fused layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cluster.checkpoint import CheckpointReader
from cluster.config import ModelConfig
from cluster.experts import ExpertShard
from cluster.model import Llama4ForCausalLM
from cluster.rope import inverse_frequencies
from cluster.transport import LocalTransport

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto`: the checkpoint's dtype on CUDA, float32 on CPU (where bf16 matmuls are slow)."""
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        return DTYPES.get(cfg.torch_dtype, torch.bfloat16)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *DTYPES]}, got {name!r}")
    return DTYPES[name]


def load_router_model(
    cfg: ModelConfig, reader: CheckpointReader, device: torch.device, dtype: torch.dtype
) -> Llama4ForCausalLM:
    with torch.device("meta"):
        model = Llama4ForCausalLM(cfg)
    state = {}
    for name, param in model.named_parameters():
        key = name
        if name == "lm_head.weight" and cfg.tie_word_embeddings and name not in reader:
            key = "model.embed_tokens.weight"
        state[name] = reader.read(key, shape=param.shape, dtype=dtype).to(device)
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq_F = inverse_frequencies(cfg.rope, cfg.head_dim).to(device)
    for module in model.modules():  # counters (non-persistent buffers) were built on "meta": start them at 0
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype, device=device))
    return model.eval().requires_grad_(False)


def expert_key(layer: int, what: str) -> str:
    return f"model.layers.{layer}.feed_forward.experts.{what}"


def load_expert_shard(
    cfg: ModelConfig,
    reader: CheckpointReader,
    layer: int,
    experts: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
) -> ExpertShard:
    e, d, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    experts = tuple(experts)
    if expert_key(layer, "gate_up_proj") in reader or f"{expert_key(layer, '0')}.gate_proj.weight" not in reader:
        gate_up = reader.read_rows(expert_key(layer, "gate_up_proj"), experts, shape=(e, d, 2 * i), dtype=dtype)
        down = reader.read_rows(expert_key(layer, "down_proj"), experts, shape=(e, i, d), dtype=dtype)
    else:
        gate_up, down = _read_unfused(reader, layer, experts, d, i, dtype)
    return ExpertShard(experts, gate_up.to(device), down.to(device))


def _read_unfused(reader, layer, experts, d, i, dtype):
    def weight(ex: int, proj: str, shape):
        return reader.read(f"{expert_key(layer, str(ex))}.{proj}.weight", shape=shape, dtype=dtype)

    gate_up = torch.stack(
        [torch.cat([weight(x, "gate_proj", (i, d)), weight(x, "up_proj", (i, d))]).T for x in experts]
    )
    down = torch.stack([weight(x, "down_proj", (d, i)).T for x in experts])
    return gate_up.contiguous(), down.contiguous()


def router_bytes(cfg: ModelConfig, reader: CheckpointReader) -> int:
    """What `load_router_model` will read, for progress display."""
    with torch.device("meta"):
        names = [name for name, _ in Llama4ForCausalLM(cfg).named_parameters()]
    return sum(
        reader.nbytes("model.embed_tokens.weight" if n == "lm_head.weight" and n not in reader else n) for n in names
    )


def experts_bytes(cfg: ModelConfig, reader: CheckpointReader, experts_by_layer: dict[int, Sequence[int]]) -> int:
    """What `load_expert_shard` will read for these experts, for progress display."""
    total = 0
    for layer, experts in experts_by_layer.items():
        if expert_key(layer, "gate_up_proj") in reader:
            total += sum(reader.nbytes(expert_key(layer, w), list(experts)) for w in ("gate_up_proj", "down_proj"))
        else:
            total += sum(
                reader.nbytes(f"{expert_key(layer, str(e))}.{w}_proj.weight")
                for e in experts
                for w in ("gate", "up", "down")
            )
    return total


def load_all_experts(cfg, reader, device, dtype) -> dict[int, ExpertShard]:
    everyone = range(cfg.num_local_experts)
    return {layer: load_expert_shard(cfg, reader, layer, everyone, device, dtype) for layer in cfg.moe_layers}


def load_in_process(
    cfg: ModelConfig, reader: CheckpointReader, device: torch.device, dtype: torch.dtype
) -> tuple[Llama4ForCausalLM, LocalTransport]:
    """The router-side model and every routed expert in this process (one device, tests, `--workers 0`)."""
    return load_router_model(cfg, reader, device, dtype), LocalTransport(load_all_experts(cfg, reader, device, dtype))
