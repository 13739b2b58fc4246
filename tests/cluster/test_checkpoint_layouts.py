"""The same weights saved with and without `language_model.`, and as several shards, give identical outputs;
missing or mis-shaped tensors fail naming the key; expert subsets are read without the other experts' bytes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cluster.checkpoint import CheckpointError, CheckpointReader
from cluster.config import load_model_config
from cluster.weights import load_expert_shard
from deploy.tiny.fp8_layout import unfuse_experts
from tests.cluster.checkpoint_edits import edited_copy, save_sharded
from tests.cluster.test_llama4_parity import full_logits, load_ours
from tests.conftest import write_json

IDS = list(range(5, 40))


@pytest.fixture
def plain(hf_checkpoint):
    path, _ = hf_checkpoint(interleave_moe_layer_step=2, num_experts_per_tok=2)
    return path


def multimodal_copy(src, dst, shards: int = 1):
    """Rewrite a Llama4ForCausalLM checkpoint as Llama4ForConditionalGeneration would store it."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    write_json(
        dst / "config.json",
        {
            "architectures": ["Llama4ForConditionalGeneration"],
            "model_type": "llama4",
            "text_config": cfg,
            "vision_config": {"hidden_size": 8},
        },
    )
    tensors = {f"language_model.{k}": v for k, v in load_file(src / "model.safetensors").items()}
    tensors["vision_model.patch_embedding.weight"] = torch.zeros(4, 4)  # ignored by the text model
    save_sharded(tensors, dst, shards)


def test_prefixed_multimodal_checkpoint_gives_identical_logits(plain, tmp_path):
    multimodal_copy(plain, tmp_path / "mm")
    expected = full_logits(*load_ours(plain), IDS)
    assert torch.equal(full_logits(*load_ours(tmp_path / "mm"), IDS), expected)


@pytest.mark.parametrize("prefixed", [False, True])
def test_sharded_checkpoint_gives_identical_logits(plain, tmp_path, prefixed):
    dst = tmp_path / "sharded"
    if prefixed:
        multimodal_copy(plain, dst, shards=3)
    else:
        edited_copy(plain, dst, shards=3)
    assert len(list(dst.glob("*.safetensors"))) == 3
    assert torch.equal(full_logits(*load_ours(dst), IDS), full_logits(*load_ours(plain), IDS))


def test_unfused_per_expert_tensors_give_identical_logits(plain, tmp_path):
    dst = edited_copy(plain, tmp_path / "unfused", unfuse_experts)
    assert torch.equal(full_logits(*load_ours(dst), IDS), full_logits(*load_ours(plain), IDS))


def test_missing_tensor_names_the_key(plain, tmp_path):
    dst = edited_copy(
        plain, tmp_path / "missing", lambda tensors: tensors.pop("model.layers.1.self_attn.k_proj.weight")
    )
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*missing"):
        load_ours(dst)


def test_misshaped_tensor_names_key_expected_and_found_shape(plain, tmp_path):
    def misshape(tensors: dict) -> None:
        tensors["model.layers.1.feed_forward.experts.down_proj"] = torch.zeros(8, 47, 64)

    dst = edited_copy(plain, tmp_path / "bad", misshape)
    with pytest.raises(CheckpointError) as err:
        load_ours(dst)
    assert "model.layers.1.feed_forward.experts.down_proj" in str(err.value)
    assert "[8, 47, 64]" in str(err.value) and "[8, 48, 64]" in str(err.value)


def test_expert_subset_reads_only_those_experts_bytes(plain):
    cfg = load_model_config(plain)
    reader = CheckpointReader(plain)
    shard = load_expert_shard(cfg, reader, 1, [2, 3, 6], torch.device("cpu"), torch.float32)
    per_expert = 4 * (cfg.hidden_size * 2 * cfg.intermediate_size + cfg.intermediate_size * cfg.hidden_size)
    assert reader.bytes_read == 3 * per_expert == shard.nbytes
    full = load_file(plain / "model.safetensors")["model.layers.1.feed_forward.experts.gate_up_proj"]
    assert torch.equal(shard.gate_up_EDI2, full[[2, 3, 6]])
    assert shard.experts == (2, 3, 6)


def test_no_safetensors_files_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        CheckpointReader(tmp_path)
