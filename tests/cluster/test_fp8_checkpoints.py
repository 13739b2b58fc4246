"""Official-layout FP8 checkpoints (compressed-tensors, per-channel scales) give transformers' tokens on the
dequantized weights, in fp32, in both variants (routed experts only; experts + shared expert + dense MLP); experts
stay FP8 with their scales; quantize-on-load equals loading the FP8 checkpoint written from the same model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster.checkpoint import CheckpointReader
from cluster.config import load_model_config
from cluster.weights import load_all_experts
from deploy.tiny.fp8_layout import write_fp8_copy
from router.reference.decode import Generator
from router.request.sampling_params import SamplingParams
from tests.cluster.test_llama4_parity import full_logits, load_ours
from tests.conftest import LLAMA3_ROPE

CPU = torch.device("cpu")
PROMPTS = [[1, 17, 33, 250, 9], [1, 5], [7, 8, 9, 10, 11, 12], [1, 300], [42] * 7, [3, 99, 4], [1, 2, 3], [200, 1]]
GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=24, ignore_eos=True)
MODELS = {
    "maverick-like": dict(interleave_moe_layer_step=2, use_qk_norm=False),
    "scout-like": dict(interleave_moe_layer_step=1, use_qk_norm=True, rope_parameters=LLAMA3_ROPE),
}


def dequantized_copy(src, dst):
    """The FP8 checkpoint's weights dequantized by hand in fp32 (w = q * scale) and re-fused into the layout
    transformers' Llama4ForCausalLM reads: the oracle's checkpoint."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(src / "model.safetensors")
    plain = {}
    for key, t in tensors.items():
        if key.endswith("_scale"):
            continue
        scale = tensors.get(key + "_scale")
        plain[key] = t.float() * scale.float() if scale is not None else t
    for key in [k for k in plain if k.endswith("experts.0.gate_proj.weight")]:
        base = key.removesuffix(".0.gate_proj.weight")
        n = sum(1 for k in plain if k.startswith(base + ".") and k.endswith(".gate_proj.weight"))
        weights = {p: [plain.pop(f"{base}.{e}.{p}_proj.weight") for e in range(n)] for p in ("gate", "up", "down")}
        plain[f"{base}.gate_up_proj"] = torch.stack(
            [torch.cat([g.T, u.T], -1) for g, u in zip(weights["gate"], weights["up"])]
        )
        plain[f"{base}.down_proj"] = torch.stack([d.T for d in weights["down"]]).contiguous()
    save_file({k: v.contiguous() for k, v in plain.items()}, dst / "model.safetensors")
    return dst


@pytest.fixture(params=[(m, s) for m in MODELS for s in ("fp8", "fp8-mlp")], ids=lambda p: f"{p[0]}-{p[1]}")
def fp8_pair(request, hf_checkpoint, tmp_path):
    """(FP8 checkpoint, transformers model on its dequantized weights)."""
    from transformers import Llama4ForCausalLM

    model, scope = request.param
    path, _ = hf_checkpoint(seed=5, **MODELS[model])
    fp8 = write_fp8_copy(path, tmp_path / f"fp8-{scope}", scope)
    oracle = dequantized_copy(fp8, tmp_path / "dequantized")
    return fp8, Llama4ForCausalLM.from_pretrained(oracle, dtype=torch.float32, attn_implementation="sdpa").eval()


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, each token from a full forward pass (no KV cache: its generate() with a
    chunked-attention cache can disagree with its own full forward on prompts shorter than a chunk)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_fp8_checkpoint_gives_transformers_greedy_tokens_on_the_dequantized_weights(fp8_pair):
    path, hf = fp8_pair
    ours = Generator.from_checkpoint(path, dtype="float32")
    for prompt in PROMPTS:
        assert ours.generate(prompt, GREEDY).token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens), prompt


def test_fp8_checkpoint_logits_match_transformers_on_the_dequantized_weights(fp8_pair):
    path, hf = fp8_pair
    ids = list(range(5, 50))
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    assert (full_logits(*load_ours(path), ids) - expected).abs().max().item() < 1e-5


def test_experts_stay_fp8_with_their_scales(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint(**MODELS["maverick-like"])
    fp8 = write_fp8_copy(path, tmp_path / "fp8")
    cfg, reader = load_model_config(fp8), CheckpointReader(fp8)
    shards = load_all_experts(cfg, reader, CPU, torch.float32)
    e, d, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    for layer, shard in shards.items():
        assert shard.is_fp8 and shard.weight_dtype == "fp8"
        assert shard.gate_up_EDI2.dtype == torch.float8_e4m3fn and shard.gate_up_EDI2.shape == (e, d, 2 * i)
        assert shard.down_EID.dtype == torch.float8_e4m3fn and shard.down_EID.shape == (e, i, d)
        assert shard.gate_up_scale_EI2.shape == (e, 2 * i) and shard.down_scale_ED.shape == (e, d)
        stored = load_file(fp8 / "model.safetensors")
        key = f"model.layers.{layer}.feed_forward.experts.3.up_proj.weight"
        assert torch.equal(shard.gate_up_EDI2[3, :, i:].T.view(torch.uint8), stored[key].view(torch.uint8))
        assert torch.equal(shard.gate_up_scale_EI2[3, i:], stored[key + "_scale"].reshape(-1).float())


@pytest.mark.parametrize("scope", ["fp8", "fp8-mlp"])
def test_quantize_on_load_equals_loading_the_fp8_checkpoint_written_from_the_same_model(hf_checkpoint, tmp_path, scope):
    path, _ = hf_checkpoint(**MODELS["maverick-like"])
    fp8 = write_fp8_copy(path, tmp_path / "fp8", scope)
    cfg = load_model_config(path)
    on_load = load_all_experts(cfg, CheckpointReader(path), CPU, torch.float32, expert_dtype="fp8")
    written = load_all_experts(cfg, CheckpointReader(fp8), CPU, torch.float32)
    for layer in cfg.moe_layers:
        a, b = on_load[layer], written[layer]
        assert a.is_fp8 and b.is_fp8
        for x, y in zip(a.pick(slice(None)), b.pick(slice(None))):
            assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride()
            assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
    prompt = PROMPTS[0]
    got = Generator.from_checkpoint(path, dtype="float32", expert_dtype="fp8").generate(prompt, GREEDY).token_ids
    if scope == "fp8":  # same experts, same bf16-or-wider rest: the same model
        assert got == Generator.from_checkpoint(fp8, dtype="float32").generate(prompt, GREEDY).token_ids


def test_expert_dtype_model_dequantizes_an_fp8_checkpoint(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint(**MODELS["maverick-like"])
    fp8 = write_fp8_copy(path, tmp_path / "fp8")
    cfg, reader = load_model_config(fp8), CheckpointReader(fp8)
    dense = load_all_experts(cfg, reader, CPU, torch.float32, expert_dtype="model")
    held = load_all_experts(cfg, reader, CPU, torch.float32)
    x = torch.randn(12, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    local = torch.arange(12) % cfg.num_local_experts
    for layer in cfg.moe_layers:
        assert not dense[layer].is_fp8 and dense[layer].gate_up_EDI2.dtype == torch.float32
        assert torch.allclose(dense[layer].forward(x, local), held[layer].forward(x, local), rtol=1e-5, atol=1e-5)
