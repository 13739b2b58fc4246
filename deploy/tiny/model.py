"""Tiny Llama 4 checkpoints (Scout-like and Maverick-like) for tests and demos, written in Hugging Face layout.

`write_tiny_model(out_dir, preset)` writes a directory that both transformers (`Llama4ForCausalLM`) and our
loader read: a text-only config.json with every math field explicit (docs/llama4.md section 11, P8),
fp32 model.safetensors with fused experts (section 7, without the `language_model.` prefix),
generation_config.json, tokenizer.json and tokenizer_config.json with Llama 4's chat template (section 9).
With `vision=True` (the CLI's and the embedded default's choice) it is a `Llama4ForConditionalGeneration` instead:
config.json with `text_config` and `vision_config` (Llama 4's vision structure at tiny sizes: 56-pixel tiles of
14-pixel patches, 4 `<|patch|>` tokens per tile), the text weights under `language_model.`, and `vision_model.*`
and `multi_modal_projector.*` beside them.

The presets are small enough that a CPU forward takes milliseconds, yet exercise what distinguishes Llama 4:
chunked attention and temperature tuning start at position 63 (chunk 64, floor_scale 64), layer 3 is NoPE,
Scout has qk-norm and llama3 rope scaling with a non-empty smoothing band, Maverick interleaves dense layers.
By default the weights are trained briefly on a counting task (deploy/tiny_training.py); `train_steps=0`
gives the random initial weights, which is what fast tests use.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from cluster.config import parse_model_config
from cluster.experts import ExpertShard
from cluster.model import Llama4ForCausalLM
from cluster.vision.config import parse_vision_config
from cluster.vision.model import VisionTower
from deploy.tiny.fp8_layout import SCOPES, fp8_tensors
from deploy.tiny.tokenizer import IMAGE_END, IMAGE_START, PATCH, build_tokenizer, save_tokenizer, token_ids
from deploy.tiny.training import DEFAULT_TRAIN_STEPS, init_tiny_model, init_tiny_tower, train

log = logging.getLogger(__name__)

PRESETS = ("scout", "maverick")
VOCAB_MULTIPLE = 64
NUM_LAYERS = 4

# Fields shared by both presets; the values that differ are in _PRESET_FIELDS.
_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 64,  # each routed expert and the shared expert
    "intermediate_size_mlp": 128,  # dense layers (Maverick's even layers)
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_local_experts": 16,
    "num_experts_per_tok": 1,
    "no_rope_layers": [1, 1, 1, 0],  # layer 3 is NoPE: global attention and temperature tuning
    "no_rope_layer_interval": 4,
    "attention_chunk_size": 64,
    "attn_temperature_tuning": True,
    "floor_scale": 64,
    "attn_scale": 0.1,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 2048,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0,
    "use_cache": True,
}

# The vision tower: Llama 4's structure at tiny sizes (the projector maps into the text hidden size, 64).
VISION_FIELDS: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,  # hidden / pixel_shuffle_ratio^2
    "image_size": 56,
    "patch_size": 14,
    "pixel_shuffle_ratio": 0.5,
    "projector_input_dim": 64,
    "projector_output_dim": 64,
    "vision_output_dim": 64,
    "num_channels": 3,
    "norm_eps": 1e-5,
    "hidden_act": "gelu",
    "multi_modal_projector_bias": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "vision_feature_select_strategy": "default",
    "attention_dropout": 0.0,
    "projector_dropout": 0.0,
    "initializer_range": 0.02,
    "model_type": "llama4_vision_model",
}

_PRESET_FIELDS: dict[str, dict[str, Any]] = {
    "scout": {
        "interleave_moe_layer_step": 1,
        "moe_layers": list(range(NUM_LAYERS)),
        "use_qk_norm": True,
        # original_max 64 with high_freq_factor 4 puts frequency 1 (wavelength ~33) in the smoothing band
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 16.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "maverick": {
        "interleave_moe_layer_step": 2,
        "moe_layers": list(range(1, NUM_LAYERS, 2)),  # layers 0 and 2 are dense
        "use_qk_norm": False,
        "rope_scaling": None,
    },
}


def write_tiny_model(
    out_dir: str | Path,
    preset: str,
    seed: int = 0,
    train_steps: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    vision: bool = False,
    vision_overrides: Mapping[str, Any] | None = None,
    quantize: str | None = None,
) -> Path:
    """Write a tiny Llama 4 checkpoint to `out_dir` (created if needed) and return its path.

    Deterministic: the same preset, seed and train_steps give byte-identical files on the same machine type.
    `train_steps=None` trains for DEFAULT_TRAIN_STEPS; 0 keeps the random initial weights. `overrides` replaces
    preset config fields (e.g. wider dims for benchmarks); token ids and vocab_size come from the tokenizer.
    `vision`: with a tiny vision tower (trained too: it names a square's colour), as Llama4ForConditionalGeneration;
    `vision_overrides` replaces its vision_config fields (e.g. Scout's tower widths for benchmarks).
    `quantize` ("fp8" or "fp8-mlp", deploy/tiny/fp8_layout.py): written in the official FP8 layout instead.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny-model preset {preset!r}; allowed: {', '.join(PRESETS)}")
    if quantize is not None and quantize not in SCOPES:
        raise ValueError(f"quantize must be one of {sorted(SCOPES)} or None, got {quantize!r}")
    steps = DEFAULT_TRAIN_STEPS if train_steps is None else train_steps
    if steps < 0:
        raise ValueError(f"train_steps must be >= 0 (or None for {DEFAULT_TRAIN_STEPS}), got {train_steps}")
    out = Path(out_dir)
    tok = build_tokenizer()
    config = tiny_config(preset, tok, overrides)
    if vision:
        config = with_vision(config, tok, vision_overrides)
    out.mkdir(parents=True, exist_ok=True)
    model, shards = init_tiny_model(parse_model_config(config, source=f"preset {preset!r}"), seed)
    tower = init_tiny_tower(VisionTower(parse_vision_config(config)), seed) if vision else None
    if steps:
        log.info("training tiny %s%s for %d steps (seed %d)", preset, " with vision" if vision else "", steps, seed)
        train(model, shards, tok, steps, seed, tower)
    weights = out / "model.safetensors"
    tensors = checkpoint_tensors(model, shards, tower)
    if quantize is not None:
        tensors, config["quantization_config"] = fp8_tensors(tensors, quantize)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors creates it owner-only; a server in a container may run as another user
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {**token_ids(tok), "do_sample": False})
    save_tokenizer(tok, out)
    log.info("wrote tiny %s checkpoint to %s", preset, out)
    return out


def tiny_config(preset: str, tok: Tokenizer, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """config.json for `preset`, text-only layout; vocab_size is the tokenizer's size rounded up to 64."""
    fields = copy.deepcopy({**_COMMON, **_PRESET_FIELDS[preset]})
    unknown = sorted(set(overrides or {}) - set(fields))
    if unknown:
        raise ValueError(f"cannot override {unknown} in a tiny model; overridable fields: {sorted(fields)}")
    vocab = -(-tok.get_vocab_size() // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "vocab_size": vocab,
        **fields,
        **(overrides or {}),
        **token_ids(tok),
        "torch_dtype": "float32",
    }


def with_vision(
    text_config: dict[str, Any], tok: Tokenizer, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The Llama4ForConditionalGeneration config.json around a tiny text config: the image token ids are the
    tokenizer's."""
    unknown = sorted(set(overrides or {}) - set(VISION_FIELDS))
    if unknown:
        raise ValueError(f"cannot override {unknown} in a tiny vision tower; overridable: {sorted(VISION_FIELDS)}")
    text = {k: v for k, v in text_config.items() if k not in ("architectures", "torch_dtype")}
    return {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": text,
        "vision_config": {**VISION_FIELDS, **(overrides or {})},
        "image_token_index": tok.token_to_id(PATCH),
        "boi_token_index": tok.token_to_id(IMAGE_START),
        "eoi_token_index": tok.token_to_id(IMAGE_END),
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def checkpoint_tensors(
    model: Llama4ForCausalLM, shards: dict[int, ExpertShard], tower: VisionTower | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor under its Hugging Face name, fp32; experts fused as gate_up_proj [E, D, 2I] and
    down_proj [E, I, D]. With a tower, the text model's names gain `language_model.` (the multimodal layout)."""
    tensors = {name: t.detach().float().contiguous() for name, t in model.state_dict().items()}
    for layer, shard in shards.items():
        prefix = f"model.layers.{layer}.feed_forward.experts"
        tensors[f"{prefix}.gate_up_proj"] = shard.gate_up_EDI2.detach().float().contiguous()
        tensors[f"{prefix}.down_proj"] = shard.down_EID.detach().float().contiguous()
    if tower is None:
        return tensors
    tensors = {f"language_model.{name}": t for name, t in tensors.items()}
    return tensors | {name: t.detach().float().contiguous() for name, t in tower.state_dict().items()}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
