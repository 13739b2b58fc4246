"""The model matches transformers' Llama4ForCausalLM: fp32 logits within 1e-5, greedy tokens identical."""

from __future__ import annotations

import pytest
import torch

from cluster.batch import ForwardBatch, SeqSlice
from cluster.checkpoint import CheckpointReader
from cluster.config import load_model_config
from cluster.transport import LocalTransport
from cluster.weights import load_all_experts, load_router_model
from router.reference.contiguous_cache import ContiguousKVCache
from router.reference.decode import Generator
from router.request.sampling_params import SamplingParams
from tests.conftest import LLAMA3_ROPE

CPU = torch.device("cpu")

VARIANTS = {
    "scout-like: moe every layer, top-1, qk-norm, llama3 rope": dict(
        interleave_moe_layer_step=1, num_experts_per_tok=1, use_qk_norm=True, rope_parameters=LLAMA3_ROPE
    ),
    "maverick-like: moe every 2nd layer, top-1, no qk-norm, plain rope": dict(
        interleave_moe_layer_step=2, num_experts_per_tok=1, use_qk_norm=False
    ),
    "top-2, moe every layer, no qk-norm, llama3 rope": dict(
        interleave_moe_layer_step=1, num_experts_per_tok=2, use_qk_norm=False, rope_parameters=LLAMA3_ROPE
    ),
    "top-2, moe every 2nd layer, qk-norm, plain rope, 8 layers": dict(
        interleave_moe_layer_step=2,
        num_experts_per_tok=2,
        use_qk_norm=True,
        num_hidden_layers=8,
        no_rope_layers=[1, 1, 1, 0] * 2,
    ),
}


def load_ours(path):
    cfg = load_model_config(path)
    reader = CheckpointReader(path)
    model = load_router_model(cfg, reader, CPU, torch.float32)
    return model, LocalTransport(load_all_experts(cfg, reader, CPU, torch.float32))


def full_logits(model, transport, ids: list[int]) -> torch.Tensor:
    batch = ForwardBatch((SeqSlice(0, len(ids), 0, 0),))
    with torch.inference_mode():
        return model(torch.tensor(ids), batch, ContiguousKVCache(), transport, all_logits=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_across_chunks(hf_checkpoint, variant):
    path, hf = hf_checkpoint(**VARIANTS[variant])
    model, transport = load_ours(path)
    ids = torch.randint(0, 320, (45,), generator=torch.Generator().manual_seed(1)).tolist()  # 6 chunks of 8
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    got = full_logits(model, transport, ids)
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_with_cache_matches_transformers_generate(hf_checkpoint, variant):
    path, hf = hf_checkpoint(**VARIANTS[variant])
    prompt = [1, 17, 33, 250, 9]
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, 5, dtype=torch.long),
            max_new_tokens=40,
            min_new_tokens=40,
            do_sample=False,
        )[0, 5:].tolist()
    gen = Generator.from_checkpoint(path, dtype="float32")
    got = gen.generate(prompt, SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=40, ignore_eos=True))
    assert got.token_ids == ref  # 45 positions: crosses five 8-token chunks


def test_incremental_decoding_equals_full_recompute(hf_checkpoint):
    path, _ = hf_checkpoint(**VARIANTS["scout-like: moe every layer, top-1, qk-norm, llama3 rope"])
    model, transport = load_ours(path)
    ids = list(range(3, 30))
    full = full_logits(model, transport, ids)
    cache, pieces, pos = ContiguousKVCache(), [], 0
    with torch.inference_mode():
        for n in (5, 1, 1, 7, 3, 1, 9):  # uneven prefill chunks, some crossing chunk boundaries
            batch = ForwardBatch((SeqSlice(0, n, pos, 0),))
            pieces.append(model(torch.tensor(ids[pos : pos + n]), batch, cache, transport, all_logits=True))
            pos += n
    assert (torch.cat(pieces) - full).abs().max().item() < 1e-5


def test_several_sequences_in_one_batch_match_each_alone(hf_checkpoint):
    path, _ = hf_checkpoint(**VARIANTS["top-2, moe every layer, no qk-norm, llama3 rope"])
    model, transport = load_ours(path)
    a, b = list(range(10, 31)), list(range(100, 112))
    batch = ForwardBatch((SeqSlice(0, len(a), 0, 0), SeqSlice(len(a), len(b), 0, 1)))
    with torch.inference_mode():
        both = model(torch.tensor(a + b), batch, ContiguousKVCache(), transport, all_logits=True)
    assert (both[: len(a)] - full_logits(model, transport, a)).abs().max().item() < 1e-5
    assert (both[len(a) :] - full_logits(model, transport, b)).abs().max().item() < 1e-5
