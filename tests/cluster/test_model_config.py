"""config.json parsing: both layouts, every math field honoured, errors naming the field."""

from __future__ import annotations

import pytest

from cluster.config import ConfigError, parse_model_config

TEXT = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def test_text_only_layout_takes_transformers_defaults():
    cfg = parse_model_config(dict(TEXT))
    assert cfg.moe_layers == tuple(range(8))
    assert cfg.rope_layers == (True, True, True, False) * 2
    assert cfg.attention_chunk_size == 8192 and cfg.floor_scale == 8192 and cfg.attn_scale == 0.1
    assert cfg.use_qk_norm and cfg.attn_temperature_tuning
    assert cfg.num_local_experts == 16 and cfg.num_experts_per_tok == 1 and cfg.intermediate_size_mlp == 16384
    assert cfg.rope.rope_type == "default" and cfg.rope.theta == 500000.0


def test_multimodal_layout_reads_text_config_and_top_level_token_ids():
    cfg = parse_model_config(
        {
            "architectures": ["Llama4ForConditionalGeneration"],
            "eos_token_id": [7, 8],
            "text_config": {**TEXT, "interleave_moe_layer_step": 2},
        }
    )
    assert cfg.architecture == "Llama4ForConditionalGeneration"
    assert cfg.moe_layers == (1, 3, 5, 7)
    assert cfg.eos_token_ids == (7, 8)


def test_explicit_moe_layers_override_the_interleave_step():
    assert parse_model_config({**TEXT, "moe_layers": [0, 5], "interleave_moe_layer_step": 2}).moe_layers == (0, 5)


def test_int_temperature_tuning_is_read_as_a_flag():
    assert parse_model_config({**TEXT, "attn_temperature_tuning": 4}).attn_temperature_tuning is True
    assert parse_model_config({**TEXT, "attn_temperature_tuning": 0}).attn_temperature_tuning is False


def test_old_and_new_rope_forms_agree():
    scaling = {
        "rope_type": "llama3",
        "factor": 16.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
    }
    old = parse_model_config({**TEXT, "rope_theta": 1e4, "rope_scaling": scaling})
    new = parse_model_config({**TEXT, "rope_parameters": {**scaling, "rope_theta": 1e4}})
    assert old.rope == new.rope and old.rope.rope_type == "llama3" and old.rope.theta == 1e4


def test_null_rope_scaling_is_plain_rope():
    assert parse_model_config({**TEXT, "rope_scaling": None}).rope.rope_type == "default"


def test_empty_no_rope_layers_means_the_default_pattern():
    assert parse_model_config({**TEXT, "no_rope_layers": []}).rope_layers == (True, True, True, False) * 2


def test_null_chunk_size_means_global_attention_everywhere():
    assert parse_model_config({**TEXT, "attention_chunk_size": None}).attention_chunk_size is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": None}, "'hidden_size' must be a positive integer"),
        ({"num_attention_heads": 5}, r"num_attention_heads \(5\) must be a multiple of num_key_value_heads \(2\)"),
        ({"num_experts_per_tok": 17}, r"num_experts_per_tok \(17\) cannot exceed num_local_experts \(16\)"),
        ({"no_rope_layers": [1, 0]}, "'no_rope_layers' must be a list of 8 values"),
        ({"moe_layers": [9]}, r"'moe_layers' must be a list of layer indices in \[0, 8\)"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, r"rope_type' must be one of \['default', 'llama3'\]"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 2.0}},
            "llama3 rope scaling needs 'rope_scaling.low_freq_factor'",
        ),
        ({"head_dim": 15}, "head_dim must be even"),
        ({"use_qk_norm": "yes"}, "'use_qk_norm' must be a boolean"),
        ({"attention_chunk_size": 0}, "attention_chunk_size must be a positive int or null"),
    ],
)
def test_contradictory_or_bad_fields_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_model_config({**TEXT, **change})


def test_missing_required_field_is_named():
    fields = dict(TEXT)
    del fields["vocab_size"]
    with pytest.raises(ConfigError, match="required field 'vocab_size' is missing"):
        parse_model_config(fields)


def test_missing_field_inside_text_config_is_named_with_its_path():
    fields = dict(TEXT)
    del fields["num_hidden_layers"]
    with pytest.raises(ConfigError, match=r"'text_config\.num_hidden_layers' is missing"):
        parse_model_config({"text_config": fields})
