"""Builds the router-side model and expert shards from a checkpoint, reading only what each side holds.

Router side: every parameter of `Llama4ForCausalLM` is read under its own name. Expert side: per MoE layer,
only the requested experts' rows of the fused `experts.gate_up_proj` [E, D, 2I] / `experts.down_proj`
[E, I, D] tensors, or the per-expert unfused tensors of FP8-style checkpoints
(`experts.{e}.gate_proj.weight` [I, D], ...), transposed to the fused layout.

FP8 (compressed-tensors, cluster/quant_config.py): the router dequantizes the FP8 modules it holds (the shared
expert, dense MLPs) into its compute dtype as it reads them. Routed experts are held as `expert_dtype` says:
"auto" as stored (FP8 stays FP8 with its scales, anything else takes the compute dtype), "fp8" (a wider checkpoint's
experts are quantized per output channel as each expert is read, cluster/fp8.py), "model" (the compute dtype;
FP8 experts are dequantized).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cluster.checkpoint import CheckpointReader
from cluster.config import ModelConfig
from cluster.experts import ExpertShard
from cluster.fp8 import dequantize_rows, quantize_rows
from cluster.model import Llama4ForCausalLM
from cluster.rope import inverse_frequencies
from cluster.transport import LocalTransport

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPERT_DTYPES = ("auto", "fp8", "model")


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
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and reader.is_fp8(module):
            state[name] = dequantize_rows(*reader.read_fp8(module, param.shape), dtype).to(device)
        else:
            state[name] = reader.read(key, shape=param.shape, dtype=dtype).to(device)
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq_F = inverse_frequencies(cfg.rope, cfg.head_dim).to(device)
    for module in model.modules():  # counters (non-persistent buffers) were built on "meta": start them at 0
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype, device=device))
    return model.eval().requires_grad_(False)


def expert_key(layer: int, what: str) -> str:
    """A routed-expert tensor's (or per-expert module's) name: `what` is `gate_up_proj`, `down_proj` or an expert id."""
    return f"model.layers.{layer}.feed_forward.experts.{what}"


def experts_fp8(reader: CheckpointReader, cfg: ModelConfig, expert_dtype: str = "auto") -> bool:
    """Whether routed experts are held in FP8: asked for, or stored so and held as stored."""
    if expert_dtype not in EXPERT_DTYPES:
        raise ValueError(f"expert_dtype must be one of {list(EXPERT_DTYPES)}, got {expert_dtype!r}")
    return expert_dtype == "fp8" or (expert_dtype == "auto" and stored_fp8(reader, cfg))


def stored_fp8(reader: CheckpointReader, cfg: ModelConfig) -> bool:
    module = f"{expert_key(cfg.moe_layers[0], '0')}.gate_proj" if cfg.moe_layers else ""
    return bool(module) and f"{module}.weight" in reader and reader.is_fp8(module)


def load_expert_shard(
    cfg: ModelConfig,
    reader: CheckpointReader,
    layer: int,
    experts: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
    expert_dtype: str = "auto",
) -> ExpertShard:
    """The experts `experts` of MoE layer `layer`, in that order, held as `expert_dtype` says (module doc)."""
    e, d, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    experts = tuple(experts)
    fp8 = experts_fp8(reader, cfg, expert_dtype)
    fused = expert_key(layer, "gate_up_proj") in reader or f"{expert_key(layer, '0')}.gate_proj.weight" not in reader
    if fused:
        gate_up = reader.read_rows(expert_key(layer, "gate_up_proj"), experts, shape=(e, d, 2 * i), dtype=None)
        down = reader.read_rows(expert_key(layer, "down_proj"), experts, shape=(e, i, d), dtype=None)
        if not fp8:
            return ExpertShard(experts, gate_up.to(device, dtype), down.to(device, dtype))
        pieces = [
            (_as_held(gate_up[x].T, None, True, dtype), _as_held(down[x].T, None, True, dtype))
            for x in range(len(experts))
        ]
    else:
        pieces = [_unfused_expert(reader, layer, x, d, i, fp8, dtype) for x in experts]
    return _stack(experts, pieces, device, fp8)


def _unfused_expert(reader, layer: int, expert: int, d: int, i: int, fp8: bool, dtype) -> tuple:
    """((gate_up [2I, D], scale [2I] | None), (down [D, I], scale [D] | None)) of one per-expert-stored expert."""

    def piece(proj: str, shape):
        module = f"{expert_key(layer, str(expert))}.{proj}"
        if reader.is_fp8(module):
            return _as_held(*reader.read_fp8(module, shape), fp8, dtype)
        return _as_held(reader.read(f"{module}.weight", shape=shape), None, fp8, dtype)

    gate, up, down = piece("gate_proj", (i, d)), piece("up_proj", (i, d)), piece("down_proj", (d, i))
    scale = torch.cat([gate[1], up[1]]) if fp8 else None
    return (torch.cat([gate[0], up[0]]), scale), down


def _as_held(w_OK: torch.Tensor, scale_O: torch.Tensor | None, fp8: bool, dtype: torch.dtype) -> tuple:
    """One [out, in] weight as it is held: (FP8, scale) or (dtype, None), converting what is stored otherwise."""
    if fp8:
        return (w_OK, scale_O) if scale_O is not None else quantize_rows(w_OK)
    return (dequantize_rows(w_OK, scale_O, dtype) if scale_O is not None else w_OK.to(dtype)), None


def _stack(experts: tuple[int, ...], pieces: list[tuple], device: torch.device, fp8: bool) -> ExpertShard:
    gate_up_EI2D = torch.stack([g for (g, _), _ in pieces]).to(device)
    down_EDI = torch.stack([w for _, (w, _) in pieces]).to(device)
    if not fp8:
        return ExpertShard(experts, gate_up_EI2D.transpose(1, 2).contiguous(), down_EDI.transpose(1, 2).contiguous())
    gate_up_scale = torch.stack([s for (_, s), _ in pieces]).to(device)
    down_scale = torch.stack([s for _, (_, s) in pieces]).to(device)
    return ExpertShard(experts, gate_up_EI2D.transpose(1, 2), down_EDI.transpose(1, 2), gate_up_scale, down_scale)


def router_bytes(cfg: ModelConfig, reader: CheckpointReader) -> int:
    """What `load_router_model` will read, for progress display."""
    with torch.device("meta"):
        names = [name for name, _ in Llama4ForCausalLM(cfg).named_parameters()]
    keys = ["model.embed_tokens.weight" if n == "lm_head.weight" and n not in reader else n for n in names]
    return sum(_weight_nbytes(reader, key) for key in keys)


def _weight_nbytes(reader: CheckpointReader, key: str) -> int:
    """A weight's stored bytes, with its scale when it is FP8."""
    module = key.removesuffix(".weight")
    scale = reader.nbytes(f"{module}.weight_scale") if key.endswith(".weight") and reader.is_fp8(module) else 0
    return reader.nbytes(key) + scale


def experts_bytes(cfg: ModelConfig, reader: CheckpointReader, experts_by_layer: dict[int, Sequence[int]]) -> int:
    """What `load_expert_shard` will read for these experts, for progress display."""
    total = 0
    for layer, experts in experts_by_layer.items():
        if expert_key(layer, "gate_up_proj") in reader:
            total += sum(reader.nbytes(expert_key(layer, w), list(experts)) for w in ("gate_up_proj", "down_proj"))
        else:
            total += sum(
                _weight_nbytes(reader, f"{expert_key(layer, str(e))}.{w}_proj.weight")
                for e in experts
                for w in ("gate", "up", "down")
            )
    return total


def load_all_experts(cfg, reader, device, dtype, expert_dtype: str = "auto") -> dict[int, ExpertShard]:
    everyone = range(cfg.num_local_experts)
    return {
        layer: load_expert_shard(cfg, reader, layer, everyone, device, dtype, expert_dtype) for layer in cfg.moe_layers
    }


def load_in_process(
    cfg: ModelConfig, reader: CheckpointReader, device: torch.device, dtype: torch.dtype, expert_dtype: str = "auto"
) -> tuple[Llama4ForCausalLM, LocalTransport]:
    """The router-side model and every routed expert in this process (one device, tests, `--workers 0`)."""
    experts = load_all_experts(cfg, reader, device, dtype, expert_dtype)
    return load_router_model(cfg, reader, device, dtype), LocalTransport(experts)
