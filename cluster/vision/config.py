"""Typed Llama 4 vision-tower configuration, read once from a checkpoint's config.json.

`vision_config` gives the tower; the top level gives the image token ids (`image_token_index` is `<|patch|>`, the
rows that take image features). The fields that fix the tower's shapes are required: transformers' class defaults
(hidden 768, image 448, vision_output_dim 7680) describe no released model. Fields whose defaults are Llama 4's own
(3 channels, ratio 0.5, projector widths 4096, rope theta 10000, the token ids) may be absent. LayerNorm eps is
1e-5 whatever `norm_eps` says, and the activation is exact GELU whatever `hidden_act` says: transformers reads
neither (reference/llama4-vision.md, "Config").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, parse_model_config, read_config_json

_REQUIRED = object()
_FIELDS: dict[str, Any] = {  # vision_config fields; _REQUIRED marks the shape-defining ones
    "hidden_size": _REQUIRED,
    "num_hidden_layers": _REQUIRED,
    "num_attention_heads": _REQUIRED,
    "intermediate_size": _REQUIRED,
    "image_size": _REQUIRED,
    "patch_size": _REQUIRED,
    "vision_output_dim": _REQUIRED,
    "num_channels": 3,
    "projector_input_dim": 4096,
    "projector_output_dim": 4096,
}
_TOKEN_IDS = {"image_token_index": 200092, "boi_token_index": 200080, "eoi_token_index": 200081}


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int  # C
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int  # encoder MLP width, and the adapter's input width (C / ratio^2)
    num_channels: int
    image_size: int  # tile side in pixels
    patch_size: int
    pixel_shuffle_ratio: float
    projector_input_dim: int
    projector_output_dim: int
    vision_output_dim: int
    rope_theta: float
    text_hidden_size: int  # D: the projector's output width
    image_token_id: int  # <|patch|>
    boi_token_id: int  # <|image_start|>
    eoi_token_id: int  # <|image_end|>

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_side(self) -> int:
        """Patches along one side of a tile (24 for Llama 4)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_side**2

    @property
    def shuffle_factor(self) -> int:
        """1 / pixel_shuffle_ratio: patches merged along each side (2 for Llama 4)."""
        return round(1 / self.pixel_shuffle_ratio)

    @property
    def patches_per_tile(self) -> int:
        """`<|patch|>` tokens (image feature rows) per tile after the pixel shuffle (144 for Llama 4)."""
        return self.num_patches // self.shuffle_factor**2


def load_vision_config(model_dir: str | Path) -> VisionConfig | None:
    """Read `<model_dir>/config.json`; None when it describes no vision tower. Raises ConfigError."""
    return parse_vision_config(*read_config_json(model_dir))


def parse_vision_config(raw: dict[str, Any], source: str = "config.json") -> VisionConfig | None:
    vision = raw.get("vision_config")
    if vision is None:
        return None
    if not isinstance(vision, dict):
        raise ConfigError(f"{source}: 'vision_config' must be an object, found {type(vision).__name__}")
    text = parse_model_config(raw, source)
    values = {name: _positive_int(vision, name, default, "vision_config.", source) for name, default in _FIELDS.items()}
    ids = {name: _token_id(raw, name, default, text.vocab_size, source) for name, default in _TOKEN_IDS.items()}
    cfg = VisionConfig(
        **values,
        pixel_shuffle_ratio=_ratio(vision, source),
        rope_theta=_rope_theta(vision, source),
        text_hidden_size=text.hidden_size,
        image_token_id=ids["image_token_index"],
        boi_token_id=ids["boi_token_index"],
        eoi_token_id=ids["eoi_token_index"],
    )
    _check_shapes(cfg, source)
    return cfg


def _check_shapes(cfg: VisionConfig, source: str) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {message}")

    v = "vision_config."
    need(
        cfg.hidden_size % cfg.num_attention_heads == 0,
        f"{v}hidden_size ({cfg.hidden_size}) must be a multiple of {v}num_attention_heads ({cfg.num_attention_heads})",
    )
    need(
        cfg.head_dim % 4 == 0,
        f"{v}hidden_size / {v}num_attention_heads = head_dim ({cfg.head_dim}) must be a "
        f"multiple of 4: the 2D rotary embedding rotates pairs, half by x and half by y",
    )
    need(
        cfg.image_size % cfg.patch_size == 0,
        f"{v}image_size ({cfg.image_size}) must be a multiple of {v}patch_size ({cfg.patch_size})",
    )
    need(
        cfg.grid_side % cfg.shuffle_factor == 0,
        f"{v}image_size / {v}patch_size = {cfg.grid_side} patches per side must be a multiple of "
        f"1 / {v}pixel_shuffle_ratio = {cfg.shuffle_factor}",
    )
    shuffled = cfg.hidden_size * cfg.shuffle_factor**2
    need(
        cfg.intermediate_size == shuffled,
        f"{v}intermediate_size ({cfg.intermediate_size}) must equal {v}hidden_size / {v}pixel_shuffle_ratio^2 = "
        f"{cfg.hidden_size} / {cfg.pixel_shuffle_ratio}^2 = {shuffled}: the vision adapter reads the pixel-shuffled "
        f"patches with a layer of that input width",
    )
    widths = (cfg.projector_input_dim, cfg.projector_output_dim, cfg.vision_output_dim)
    need(
        len(set(widths)) == 1,
        f"{v}projector_input_dim ({widths[0]}), {v}projector_output_dim ({widths[1]}) and {v}vision_output_dim "
        f"({widths[2]}) must be equal: the adapter maps input -> output -> output and the projector reads "
        f"vision_output_dim",
    )


def _positive_int(obj: dict, name: str, default: Any, prefix: str, source: str) -> int:
    if name not in obj and default is _REQUIRED:
        raise ConfigError(f"{source}: required field '{prefix}{name}' is missing")
    value = obj.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{source}: field '{prefix}{name}' must be a positive integer, found {value!r}")
    return value


def _token_id(raw: dict, name: str, default: int, vocab_size: int, source: str) -> int:
    value = raw.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
        raise ConfigError(
            f"{source}: field '{name}' must be a token id in [0, {vocab_size}) (text_config.vocab_size), "
            f"found {value!r}"
        )
    return value


def _ratio(vision: dict, source: str) -> float:
    value = vision.get("pixel_shuffle_ratio", 0.5)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
    if not ok or not math.isclose(1 / value, round(1 / value), rel_tol=0, abs_tol=1e-9):
        raise ConfigError(
            f"{source}: field 'vision_config.pixel_shuffle_ratio' must be 1/n for a whole n "
            f"(Llama 4: 0.5), found {value!r}"
        )
    return float(value)


def _rope_theta(vision: dict, source: str) -> float:
    params = vision.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(
            f"{source}: field 'vision_config.rope_parameters' must be an object or null, found {params!r}"
        )
    name, value = "rope_theta", vision.get("rope_theta", 10000.0)
    if params and "rope_theta" in params:
        name, value = "rope_parameters.rope_theta", params["rope_theta"]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ConfigError(f"{source}: field 'vision_config.{name}' must be a positive number, found {value!r}")
    return float(value)
