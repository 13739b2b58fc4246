"""Typed Llama 4 text-model configuration, read once from a checkpoint's config.json.

Both layouts are accepted: the multimodal `Llama4ForConditionalGeneration` config (text fields under
`text_config`) and the text-only `Llama4ForCausalLM` config (fields at the top level). Every field that changes
the math is honoured; fields absent from the file take transformers' Llama4TextConfig defaults, so a config
that transformers loads gives the model transformers builds (docs/llama4.md, sections 1 and 11).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROPE_TYPES = ("default", "llama3")


class ConfigError(ValueError):
    """A config.json that cannot describe a Llama 4 text model; the message names the field."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 500000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # width of each routed expert and of the shared expert
    intermediate_size_mlp: int  # width of dense (non-MoE) layers
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    moe_layers: tuple[int, ...]
    rope_layers: tuple[bool, ...]  # True: RoPE + chunked attention; False: NoPE + global attention
    attention_chunk_size: int | None
    use_qk_norm: bool
    attn_temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    architecture: str = "Llama4ForCausalLM"

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)


_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# transformers' Llama4TextConfig defaults for everything else
_DEFAULTS: dict[str, Any] = {
    "intermediate_size_mlp": 16384,
    "head_dim": 128,
    "num_local_experts": 16,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 1,
    "no_rope_layer_interval": 4,
    "attention_chunk_size": 8192,
    "use_qk_norm": True,
    "attn_temperature_tuning": True,
    "floor_scale": 8192,
    "attn_scale": 0.1,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096 * 32,
    "tie_word_embeddings": False,
}


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read `<model_dir>/config.json`; raises ConfigError (never KeyError) on anything unusable."""
    return parse_model_config(*read_config_json(model_dir))


def read_config_json(model_dir: str | Path) -> tuple[dict[str, Any], str]:
    """`<model_dir>/config.json` as a JSON object, and its path (for messages); raises ConfigError."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise ConfigError(f"model directory {str(model_dir)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in the model directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw, str(path)


def parse_model_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    text = raw.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise ConfigError(f"{source}: 'text_config' must be an object, found {type(text).__name__}")
    fields = _Fields(text if text is not None else raw, "text_config." if text is not None else "", source)
    archs = raw.get("architectures") or ["Llama4ForCausalLM"]
    top_tie = raw.get("tie_word_embeddings") if text is not None else None

    n_layers = fields.positive_int("num_hidden_layers")
    n_heads = fields.positive_int("num_attention_heads")
    if fields.get("num_key_value_heads", 8) is None:  # HF: absent -> 8, null -> one kv head per q head
        fields.obj = {**fields.obj, "num_key_value_heads": n_heads}
    n_kv = fields.positive_int("num_key_value_heads", default=8)
    if n_heads % n_kv:
        raise ConfigError(
            f"{source}: num_attention_heads ({n_heads}) must be a multiple of num_key_value_heads ({n_kv})"
        )
    if fields.get("head_dim") is None:  # HF derives it only when explicitly null
        fields.obj = {**fields.obj, "head_dim": fields.positive_int("hidden_size") // n_heads}
    head_dim = fields.positive_int("head_dim")
    if head_dim % 2:
        raise ConfigError(f"{source}: {fields.prefix}head_dim must be even for RoPE, found {head_dim}")
    n_experts = fields.positive_int("num_local_experts")
    top_k = fields.positive_int("num_experts_per_tok")
    if top_k > n_experts:
        raise ConfigError(f"{source}: num_experts_per_tok ({top_k}) cannot exceed num_local_experts ({n_experts})")
    chunk = fields.get("attention_chunk_size")
    if chunk is not None and (not _is_int(chunk) or chunk < 1):
        raise ConfigError(
            f"{source}: {fields.prefix}attention_chunk_size must be a positive int or null, found {chunk!r}"
        )
    eos = raw.get("eos_token_id", fields.get("eos_token_id", None))
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return ModelConfig(
        vocab_size=fields.positive_int("vocab_size"),
        hidden_size=fields.positive_int("hidden_size"),
        intermediate_size=fields.positive_int("intermediate_size"),
        intermediate_size_mlp=fields.positive_int("intermediate_size_mlp"),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        num_local_experts=n_experts,
        num_experts_per_tok=top_k,
        moe_layers=_moe_layers(fields, n_layers),
        rope_layers=_rope_layers(fields, n_layers),
        attention_chunk_size=chunk,
        use_qk_norm=fields.boolish("use_qk_norm"),
        attn_temperature_tuning=fields.boolish("attn_temperature_tuning"),
        floor_scale=fields.positive_number("floor_scale"),
        attn_scale=fields.number("attn_scale"),
        rms_norm_eps=fields.positive_number("rms_norm_eps"),
        rope=_rope(fields),
        max_position_embeddings=fields.positive_int("max_position_embeddings"),
        tie_word_embeddings=bool(top_tie) if top_tie is not None else fields.boolish("tie_word_embeddings"),
        bos_token_id=raw.get("bos_token_id", fields.get("bos_token_id", None)),
        eos_token_ids=eos_ids,
        pad_token_id=raw.get("pad_token_id", fields.get("pad_token_id", None)),
        torch_dtype=str(fields.get("torch_dtype", raw.get("torch_dtype", raw.get("dtype", "bfloat16")))),
        architecture=str(archs[0]),
    )


class _Fields:
    """Typed access to one JSON object, with errors that name the field as it appears in the file."""

    def __init__(self, obj: dict[str, Any], prefix: str, source: str):
        self.obj, self.prefix, self.source = obj, prefix, source

    def get(self, name: str, default: Any = ...) -> Any:
        if name in self.obj:
            return self.obj[name]
        if default is not ...:
            return default
        if name in _DEFAULTS:
            return _DEFAULTS[name]
        raise ConfigError(f"{self.source}: required field '{self.prefix}{name}' is missing")

    def fail(self, name: str, want: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.source}: field '{self.prefix}{name}' must be {want}, found {value!r}")

    def positive_int(self, name: str, default: Any = ...) -> int:
        value = self.get(name, default)
        if not _is_int(value) or value < 1:
            raise self.fail(name, "a positive integer", value)
        return int(value)

    def number(self, name: str) -> float:
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(name, "a number", value)
        return float(value)

    def positive_number(self, name: str) -> float:
        value = self.number(name)
        if value <= 0:
            raise self.fail(name, "a positive number", value)
        return value

    def boolish(self, name: str) -> bool:
        # Copies of Scout configs carry attn_temperature_tuning as the int 4: any truthy int means on.
        value = self.get(name)
        if isinstance(value, bool) or _is_int(value):
            return bool(value)
        raise self.fail(name, "a boolean (or an int used as one)", value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _moe_layers(f: _Fields, n_layers: int) -> tuple[int, ...]:
    explicit = f.get("moe_layers", None)
    if explicit is not None:
        if not isinstance(explicit, list) or not all(_is_int(v) and 0 <= v < n_layers for v in explicit):
            raise f.fail("moe_layers", f"a list of layer indices in [0, {n_layers})", explicit)
        return tuple(sorted(set(explicit)))
    step = f.positive_int("interleave_moe_layer_step")
    return tuple(range(step - 1, n_layers, step))


def _rope_layers(f: _Fields, n_layers: int) -> tuple[bool, ...]:
    given = f.get("no_rope_layers", None)
    if not given:  # absent, null or [] all mean the default "every Nth layer is NoPE" pattern
        interval = f.positive_int("no_rope_layer_interval")
        return tuple((i + 1) % interval != 0 for i in range(n_layers))
    if not isinstance(given, list) or len(given) != n_layers or any(v not in (0, 1) for v in given):
        raise f.fail("no_rope_layers", f"a list of {n_layers} values, each 0 (NoPE) or 1 (RoPE)", given)
    return tuple(bool(v) for v in given)


def _rope(f: _Fields) -> RopeConfig:
    params = f.get("rope_parameters", None)
    name = "rope_parameters"
    if params is None:
        params, name = f.get("rope_scaling", None), "rope_scaling"
    if params is not None and not isinstance(params, dict):
        raise f.fail(name, "an object or null", params)
    params = dict(params or {})
    theta = params.get("rope_theta", f.get("rope_theta", 500000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise f.fail("rope_theta", "a positive number", theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise f.fail(f"{name}.rope_type", f"one of {list(ROPE_TYPES)}", rope_type)
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    try:
        rope = RopeConfig(
            theta=float(theta),
            rope_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"{f.source}: llama3 rope scaling needs '{f.prefix}{name}.{e.args[0]}'") from None
    if rope.factor <= 0 or rope.low_freq_factor <= 0 or rope.high_freq_factor <= 0:
        raise f.fail(name, "positive factor, low_freq_factor and high_freq_factor", params)
    return rope
