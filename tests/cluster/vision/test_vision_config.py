"""The vision config is read from config.json with errors naming the field, its shapes are checked against each
other, and a checkpoint without `vision_config` has no vision tower."""

from __future__ import annotations

import copy
import json

import pytest

from cluster.config import ConfigError
from cluster.vision.config import load_vision_config, parse_vision_config
from tests.conftest import BASE_CONFIG

SCOUT_VISION = {  # Llama-4-Scout-17B-16E-Instruct's vision_config
    "attention_dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 1408,
    "image_size": 336,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "model_type": "llama4_vision_model",
    "multi_modal_projector_bias": False,
    "norm_eps": 1e-05,
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 34,
    "patch_size": 14,
    "pixel_shuffle_ratio": 0.5,
    "projector_dropout": 0.0,
    "projector_input_dim": 4096,
    "projector_output_dim": 4096,
    "rope_theta": 10000,
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
    "vision_output_dim": 4096,
}


def scout_like(**vision_changes) -> dict:
    text = {**BASE_CONFIG, "vocab_size": 202048, "hidden_size": 5120, "head_dim": 128, "num_attention_heads": 40}
    raw = {
        "architectures": ["Llama4ForConditionalGeneration"],
        "boi_token_index": 200080,
        "eoi_token_index": 200081,
        "image_token_index": 200092,
        "text_config": text,
        "vision_config": copy.deepcopy(SCOUT_VISION),
    }
    for key, value in vision_changes.items():
        if value is None:
            del raw["vision_config"][key]
        else:
            raw["vision_config"][key] = value
    return raw


def test_scout_vision_config():
    cfg = parse_vision_config(scout_like())
    assert (cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers, cfg.num_patches) == (1408, 88, 34, 576)
    assert (cfg.shuffle_factor, cfg.patches_per_tile, cfg.text_hidden_size) == (2, 144, 5120)
    assert (cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id, cfg.rope_theta) == (200092, 200080, 200081, 1e4)


def test_rope_theta_is_read_from_rope_parameters_too():
    raw = scout_like(rope_theta=None, rope_parameters={"rope_theta": 500, "rope_type": "default"})
    assert parse_vision_config(raw).rope_theta == 500.0


def test_no_vision_config_means_no_vision_tower(tmp_path):
    assert parse_vision_config({**BASE_CONFIG}) is None
    (tmp_path / "config.json").write_text(json.dumps(BASE_CONFIG))
    assert load_vision_config(tmp_path) is None


def test_missing_shape_field_is_named():
    with pytest.raises(ConfigError, match=r"required field 'vision_config\.image_size' is missing"):
        parse_vision_config(scout_like(image_size=None))


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"'vision_config\.num_hidden_layers' must be a positive integer, found -1"):
        parse_vision_config(scout_like(num_hidden_layers=-1))


def test_intermediate_size_must_equal_the_shuffled_width():
    with pytest.raises(ConfigError) as err:
        parse_vision_config(scout_like(intermediate_size=4096))
    message = str(err.value)
    assert "vision_config.intermediate_size (4096)" in message and "vision_config.hidden_size" in message
    assert "= 5632" in message


def test_projector_widths_must_agree():
    with pytest.raises(ConfigError) as err:
        parse_vision_config(scout_like(vision_output_dim=7680))
    assert "vision_config.projector_input_dim (4096)" in str(err.value)
    assert "vision_config.vision_output_dim (7680)" in str(err.value)


def test_pixel_shuffle_ratio_must_be_a_unit_fraction():
    with pytest.raises(ConfigError, match=r"'vision_config\.pixel_shuffle_ratio' must be 1/n"):
        parse_vision_config(scout_like(pixel_shuffle_ratio=0.3))


def test_heads_must_split_the_hidden_size_into_rotary_halves():
    with pytest.raises(ConfigError, match=r"head_dim \(22\) must be a multiple of 4"):
        parse_vision_config(scout_like(num_attention_heads=64))


def test_patch_grid_must_divide():
    with pytest.raises(ConfigError, match=r"vision_config\.image_size \(330\) must be a multiple of"):
        parse_vision_config(scout_like(image_size=330))


def test_image_token_id_must_be_in_the_vocabulary():
    raw = scout_like()
    raw["image_token_index"] = 300000
    with pytest.raises(ConfigError, match=r"'image_token_index' must be a token id in \[0, 202048\)"):
        parse_vision_config(raw)
