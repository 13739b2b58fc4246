"""Shared fixtures: tiny random Llama 4 checkpoints written by transformers itself (the numerical oracle)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from deploy.tiny.model import write_tiny_model
from tests.procs import ray_gone, ray_processes

BASE_CONFIG = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=48,
    intermediate_size_mlp=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=8,
    num_experts_per_tok=1,
    interleave_moe_layer_step=1,
    no_rope_layers=[1, 1, 1, 0],
    attention_chunk_size=8,  # sequences of 40+ tokens cross several chunks
    floor_scale=4,  # temperature tuning active from position 3 on
    attn_scale=0.1,
    attn_temperature_tuning=True,
    use_qk_norm=True,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=[2],
    pad_token_id=0,
    tie_word_embeddings=False,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 16.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,  # a non-empty smoothing band, unlike Scout's 1/1
    "original_max_position_embeddings": 16,
}


def hf_text_config(**overrides):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is the test oracle (pip install -e '.[test]')"
    )
    fields = {**BASE_CONFIG, **overrides}
    fields.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 500000.0})
    return transformers.Llama4TextConfig(attn_implementation="sdpa", **fields)


def make_hf_model(seed: int = 0, **overrides):
    """A transformers Llama4ForCausalLM with weights drawn wide enough that routing and argmax are decisive."""
    from transformers import Llama4ForCausalLM

    torch.manual_seed(seed)
    model = Llama4ForCausalLM(hf_text_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: (directory, transformers model) for a tiny config with the given overrides."""

    def make(seed: int = 0, **overrides) -> tuple[Path, object]:
        model = make_hf_model(seed, **overrides)
        out = tmp_path / f"ckpt-{len(list(tmp_path.iterdir()))}"
        model.save_pretrained(out)
        return out, model

    return make


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))


def free_port() -> int:
    """A port nothing listens on right now, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random (untrained) tiny Scout written by the project's own writer: the end-to-end tests' checkpoint."""
    return str(write_tiny_model(tmp_path_factory.mktemp("tiny-scout"), "scout", train_steps=0))


@pytest.fixture
def no_ray_left():
    """The test starts with no Ray process on the machine and leaves none behind (tests kill only their own)."""
    assert ray_gone(), f"another Ray is running: {ray_processes()}"
    yield
    assert ray_gone(), ray_processes()
