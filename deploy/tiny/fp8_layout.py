"""A checkpoint's tensors rewritten in the official FP8 layout (compressed-tensors `float-quantized`, as in
meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8): routed experts unfused, one set per expert,
`experts.E.{gate,up,down}_proj.weight` as float8_e4m3fn in `[out, in]` layout, each with a `.weight_scale` of shape
`[out, 1]` (per channel, symmetric, static; `rowmax|w| / 448`), input activations per token and dynamic (no scale),
and a `quantization_config` that says so.

Two scopes: `fp8` quantizes the routed experts only (Meta's checkpoint: the ignore list names the shared experts and
dense MLPs one by one, beside patterns for attention, the gate, the head and vision); `fp8-mlp` also quantizes the
shared expert and the dense MLPs (llm-compressor's FP8_DYNAMIC recipe for Llama 4: an ignore list of patterns).
The weights are quantized with cluster/fp8.py's `quantize_rows`, the function quantize-on-load uses, so that the
two agree bit for bit. Scales are stored in the source weights' dtype.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cluster.fp8 import quantize_rows

SCOPES = {"fp8": "routed experts", "fp8-mlp": "routed experts, shared expert and dense MLPs"}
_FUSED = re.compile(r"^(?P<base>.*\.feed_forward\.experts)\.gate_up_proj$")
_EXPERT = re.compile(r"\.feed_forward\.experts\.\d+\.(gate|up|down)_proj\.weight$")
_MLP = re.compile(r"\.feed_forward\.(shared_expert\.)?(gate|up|down)_proj\.weight$")
_PATTERNS = ["re:.*self_attn", "re:.*router", "re:.*lm_head", "re:.*vision_model.*", "re:.*multi_modal_projector.*"]
_SCHEME = {
    "targets": ["Linear"],
    "weights": {
        "num_bits": 8,
        "type": "float",
        "strategy": "channel",
        "symmetric": True,
        "dynamic": False,
        "group_size": None,
        "block_structure": None,
        "observer": "minmax",
    },
    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True},
    "output_activations": None,
    "format": "float-quantized",
}


def fp8_tensors(tensors: dict[str, torch.Tensor], scope: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors in the FP8 layout, the `quantization_config` for config.json) from a checkpoint's tensors, fused
    (`experts.gate_up_proj` [E, D, 2I], `experts.down_proj` [E, I, D]) or per expert."""
    if scope not in SCOPES:
        raise ValueError(f"FP8 scope must be one of {sorted(SCOPES)}, got {scope!r}")
    out = dict(tensors)
    unfuse_experts(out)
    quantized = [k for k in out if _EXPERT.search(k) or (scope == "fp8-mlp" and _MLP.search(k))]
    for key in quantized:
        q, scale = quantize_rows(out[key])
        out[key], out[key + "_scale"] = q, scale.to(out[key].dtype).reshape(-1, 1).contiguous()
    ignore = list(_PATTERNS)
    if scope == "fp8":  # the shared experts and dense MLPs by name, as an exported ignore list has them
        ignore += sorted(k.removesuffix(".weight") for k in out if _MLP.search(k))
    return out, {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": _SCHEME},
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def unfuse_experts(tensors: dict[str, torch.Tensor]) -> None:
    """In place: fused experts (`experts.gate_up_proj` [E, D, 2I], `experts.down_proj` [E, I, D]) become one set
    of `[out, in]` weights per expert, as the official FP8 checkpoints store them."""
    for key in [k for k in tensors if _FUSED.match(k)]:
        base = _FUSED.match(key)["base"]
        gate_up, down = tensors.pop(key), tensors.pop(f"{base}.down_proj")
        width = down.shape[1]
        for e in range(gate_up.shape[0]):
            tensors[f"{base}.{e}.gate_proj.weight"] = gate_up[e, :, :width].T.contiguous()
            tensors[f"{base}.{e}.up_proj.weight"] = gate_up[e, :, width:].T.contiguous()
            tensors[f"{base}.{e}.down_proj.weight"] = down[e].T.contiguous()


def write_fp8_copy(src: str | Path, dst: str | Path, scope: str = "fp8") -> Path:
    """Copy a single-file checkpoint directory (config.json, model.safetensors and the rest) into `dst` in the FP8
    layout."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors, quantization = fp8_tensors(load_file(src / "model.safetensors"), scope)
    for path in src.iterdir():
        if path.is_file() and path.name not in ("model.safetensors", "config.json"):
            (dst / path.name).write_bytes(path.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}, indent=2) + "\n")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "model.safetensors").chmod(0o644)
    return dst
