"""The tiny Llama 4 checkpoints: Hugging Face layout, equal logits in transformers and our loader, the presets'
distinguishing features, the tokenizer, determinism, and that the shipped trained models (deploy/tiny/shipped.py)
count and name colours on prompts and images training never showed."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from cluster.batch import ForwardBatch, SeqSlice
from cluster.checkpoint import CheckpointReader
from cluster.config import load_model_config
from cluster.rope import inverse_frequencies
from cluster.transport import LocalTransport
from cluster.weights import load_all_experts, load_router_model
from deploy.tiny.model import PRESETS, write_tiny_model
from deploy.tiny.shipped import shipped_dir
from deploy.tiny.tokenizer import EOS_TOKENS, SPECIAL_TOKENS, chat_text
from deploy.tiny.training import held_out_prompts
from router.reference.contiguous_cache import ContiguousKVCache

CPU = torch.device("cpu")
SEQ_LEN = 150  # past the 64-token chunk and floor_scale 64, so chunking and temperature tuning take effect


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {p: write_tiny_model(root / p, p, seed=0, train_steps=0) for p in PRESETS}


def ours(model_dir, **cfg_overrides):
    cfg = dataclasses.replace(load_model_config(model_dir), **cfg_overrides)
    reader = CheckpointReader(model_dir)
    model = load_router_model(cfg, reader, CPU, torch.float32)
    return model, LocalTransport(load_all_experts(cfg, reader, CPU, torch.float32))


def all_logits(model, transport, ids_T):
    batch = ForwardBatch((SeqSlice(start=0, length=len(ids_T), pos0=0, slot=0),))
    return model(ids_T, batch, ContiguousKVCache(), transport, all_logits=True)  # [T, V]


def random_ids(vocab_size: int, n: int = SEQ_LEN) -> torch.Tensor:
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(1))


def greedy(model, transport, prompt_ids: list[int], max_new: int, stop_ids) -> list[int]:
    cache, pos, out = ContiguousKVCache(), 0, []
    ids_T = torch.tensor(prompt_ids)
    for _ in range(max_new):
        batch = ForwardBatch((SeqSlice(start=0, length=len(ids_T), pos0=pos, slot=0),))
        token = int(model(ids_T, batch, cache, transport)[0].argmax())
        pos += len(ids_T)
        out.append(token)
        if token in stop_ids:
            break
        ids_T = torch.tensor([token])
    return out


def test_unknown_preset_is_rejected_naming_the_allowed_ones(tmp_path):
    with pytest.raises(ValueError, match="scout, maverick"):
        write_tiny_model(tmp_path, "behemoth")


def test_overrides_replace_preset_fields_and_unknown_fields_are_rejected(tmp_path):
    model_dir = write_tiny_model(tmp_path / "wide", "maverick", train_steps=0, overrides={"hidden_size": 96})
    assert load_model_config(model_dir).hidden_size == 96
    with pytest.raises(ValueError, match="hidden_sise"):
        write_tiny_model(tmp_path / "typo", "maverick", train_steps=0, overrides={"hidden_sise": 96})


@pytest.mark.parametrize("preset", PRESETS)
def test_transformers_and_our_loader_give_the_same_logits(tiny_dirs, preset):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Llama4ForCausalLM.from_pretrained(tiny_dirs[preset], dtype=torch.float32).eval()
    model, transport = ours(tiny_dirs[preset])
    ids_T = random_ids(model.config.vocab_size)
    with torch.no_grad():
        expected_TV = hf(ids_T[None]).logits[0]
        got_TV = all_logits(model, transport, ids_T)
    assert expected_TV.std() > 0.3  # random weights give logits far from zero: the comparison means something
    assert (got_TV - expected_TV).abs().max() < 1e-5


@pytest.mark.parametrize("preset", PRESETS)
def test_short_sequences_already_exercise_chunking_and_temperature_tuning(tiny_dirs, preset):
    model, transport = ours(tiny_dirs[preset])
    ids_T = random_ids(model.config.vocab_size)
    base_TV = all_logits(model, transport, ids_T)
    for override in ({"attention_chunk_size": None}, {"attn_temperature_tuning": False}):
        other_TV = all_logits(*ours(tiny_dirs[preset], **override), ids_T)
        assert torch.allclose(other_TV[:63], base_TV[:63], atol=1e-5, rtol=0), override
        assert (other_TV[64:] - base_TV[64:]).abs().max() > 1e-3, override


def test_scout_config_is_all_moe_with_qk_norm_and_llama3_rope(tiny_dirs):
    raw = json.loads((tiny_dirs["scout"] / "config.json").read_text())
    cfg = load_model_config(tiny_dirs["scout"])
    assert raw["architectures"] == ["Llama4ForCausalLM"] and raw["model_type"] == "llama4_text"
    assert raw["moe_layers"] == [0, 1, 2, 3] and raw["no_rope_layers"] == [1, 1, 1, 0]
    assert raw["use_qk_norm"] is True and raw["rope_scaling"]["rope_type"] == "llama3"
    assert (raw["num_local_experts"], raw["num_experts_per_tok"]) == (16, 1)
    assert raw["num_key_value_heads"] < raw["num_attention_heads"]
    unscaled_F = inverse_frequencies(dataclasses.replace(cfg.rope, rope_type="default"), cfg.head_dim)
    ratio_F = unscaled_F / inverse_frequencies(cfg.rope, cfg.head_dim)
    smoothed = (ratio_F > 1.0001) & (ratio_F < cfg.rope.factor - 1e-3)
    assert smoothed.any()  # the llama3 smoothing band is not empty


def test_maverick_config_interleaves_wider_dense_layers_without_qk_norm_or_rope_scaling(tiny_dirs):
    raw = json.loads((tiny_dirs["maverick"] / "config.json").read_text())
    assert raw["moe_layers"] == [1, 3] and raw["interleave_moe_layer_step"] == 2
    assert raw["use_qk_norm"] is False and raw["rope_scaling"] is None
    assert raw["intermediate_size_mlp"] > raw["intermediate_size"]
    reader = CheckpointReader(tiny_dirs["maverick"])
    for layer in (0, 2):
        shape = reader.shape(f"model.layers.{layer}.feed_forward.gate_proj.weight")
        assert shape == (raw["intermediate_size_mlp"], raw["hidden_size"])
        assert f"model.layers.{layer}.feed_forward.router.weight" not in reader


@pytest.mark.parametrize("preset", PRESETS)
def test_checkpoint_is_fp32_with_fused_experts_and_an_untied_head(tiny_dirs, preset):
    raw = json.loads((tiny_dirs[preset] / "config.json").read_text())
    e, d, i = raw["num_local_experts"], raw["hidden_size"], raw["intermediate_size"]
    with safe_open(str(tiny_dirs[preset] / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert all(f.get_slice(k).get_dtype() == "F32" for k in keys)
        for layer in raw["moe_layers"]:
            assert f.get_slice(f"model.layers.{layer}.feed_forward.experts.gate_up_proj").get_shape() == [e, d, 2 * i]
            assert f.get_slice(f"model.layers.{layer}.feed_forward.experts.down_proj").get_shape() == [e, i, d]
        assert not torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= keys
    assert raw["tie_word_embeddings"] is False and raw["torch_dtype"] == "float32"


def test_tokenizer_round_trips_text_and_adds_bos(tiny_dirs):
    tok = Tokenizer.from_file(str(tiny_dirs["scout"] / "tokenizer.json"))
    bos = json.loads((tiny_dirs["scout"] / "config.json").read_text())["bos_token_id"]
    for text in ["count from 37", "37 38 39 40", "Héllo, wörld! 日本語 😀\n\n\ttabs  and  spaces "]:
        ids = tok.encode(text).ids
        assert ids[0] == bos and bos not in ids[1:]
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_special_tokens_sit_at_the_ids_config_names(tiny_dirs):
    tok = Tokenizer.from_file(str(tiny_dirs["scout"] / "tokenizer.json"))
    raw = json.loads((tiny_dirs["scout"] / "config.json").read_text())
    generation = json.loads((tiny_dirs["scout"] / "generation_config.json").read_text())
    bos = tok.token_to_id("<|begin_of_text|>")
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(bos, bos + len(SPECIAL_TOKENS)))
    assert raw["bos_token_id"] == generation["bos_token_id"] == bos
    assert raw["eos_token_id"] == generation["eos_token_id"] == [tok.token_to_id(t) for t in EOS_TOKENS]
    assert raw["pad_token_id"] == generation["pad_token_id"] == tok.token_to_id("<|finetune_right_pad|>") == bos + 18
    assert raw["vocab_size"] % 64 == 0 and tok.get_vocab_size() <= raw["vocab_size"] < tok.get_vocab_size() + 64


def test_transformers_renders_the_llama4_chat_template(tiny_dirs):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dirs["scout"])
    messages = [{"role": "user", "content": "count from 37"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == chat_text("count from 37")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|eot|>", "<|finetune_right_pad|>")


def test_same_seed_writes_identical_files_and_another_seed_other_weights(tmp_path):
    a = write_tiny_model(tmp_path / "a", "scout", seed=3, train_steps=2)
    b = write_tiny_model(tmp_path / "b", "scout", seed=3, train_steps=2)
    c = write_tiny_model(tmp_path / "c", "scout", seed=4, train_steps=2)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_the_callers_thread_count_does_not_change_training(tmp_path):
    """Training pins its own thread count (deploy/tiny/training.py), so torch.set_num_threads before it changes
    nothing; another CPU still may (hence the shipped checkpoints)."""
    before, written = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            written.append(write_tiny_model(tmp_path / str(threads), "scout", seed=3, train_steps=2))
            assert torch.get_num_threads() == threads  # restored after training
    finally:
        torch.set_num_threads(before)
    one, two = written
    assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()


def assert_counts_on_held_out_prompts(model_dir):
    model, transport = ours(model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    eos = set(model.config.eos_token_ids)
    for user, answer in held_out_prompts():
        prompt_ids = tok.encode(chat_text(user), add_special_tokens=False).ids
        got = tok.decode(greedy(model, transport, prompt_ids, 24, eos), skip_special_tokens=False)
        assert got == answer + "<|eot|>", user
    continued = greedy(model, transport, tok.encode("37 38 39 40").ids, 10, set())
    assert tok.decode(continued) == " 41 42 43 44 45"


@pytest.mark.parametrize("preset", PRESETS)
def test_trained_model_counts_on_held_out_prompts(preset):
    """The shipped checkpoint, which the embedded default and the demo copy: the same on any CPU."""
    assert_counts_on_held_out_prompts(shipped_dir(preset))


# ---- the vision tower ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-vision")
    return {p: write_tiny_model(root / p, p, seed=0, train_steps=0, vision=True) for p in PRESETS}


def test_image_tokens_sit_where_llama4_puts_them(tiny_dirs):
    tok = Tokenizer.from_file(str(tiny_dirs["scout"] / "tokenizer.json"))
    bos = tok.token_to_id("<|begin_of_text|>")
    llama4 = {
        "image_start": 80,
        "image_end": 81,
        "tile_x_separator": 84,
        "tile_y_separator": 85,
        "image": 90,
        "patch": 92,
    }
    assert {name: tok.token_to_id(f"<|{name}|>") - bos for name in llama4} == llama4


@pytest.mark.parametrize("preset", PRESETS)
def test_a_vision_checkpoint_is_llama4_for_conditional_generation_in_transformers_and_ours(vision_dirs, preset):
    transformers = pytest.importorskip("transformers")
    from cluster.vision.config import load_vision_config
    from cluster.vision.weights import load_vision_tower

    path = vision_dirs[preset]
    raw = json.loads((path / "config.json").read_text())
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert raw["architectures"] == ["Llama4ForConditionalGeneration"] and raw["image_token_index"] == tok.token_to_id(
        "<|patch|>"
    )
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    cfg = load_vision_config(path)
    tower = load_vision_tower(cfg, CheckpointReader(path), CPU, torch.float32)
    pixels_T3SS = torch.rand(3, 3, 56, 56, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model, transport = ours(path)
    ids_T = random_ids(model.config.vocab_size)
    with torch.no_grad():
        expected_PD = hf.multi_modal_projector(hf.vision_model(pixels_T3SS).last_hidden_state.flatten(0, 1))
        assert (tower(pixels_T3SS) - expected_PD).abs().max() < 1e-5 and cfg.patches_per_tile == 4
        expected_TV = hf.language_model(ids_T[None]).logits[0]
        assert (all_logits(model, transport, ids_T) - expected_TV).abs().max() < 1e-5


@pytest.mark.parametrize("preset", PRESETS)
def test_trained_vision_model_names_the_colour_of_unseen_squares(preset):
    import random

    from cluster.vision.config import load_vision_config
    from cluster.vision.merge import embed_with_images
    from cluster.vision.weights import load_vision_tower
    from deploy.tiny.squares import HELD_OUT_SEED, SIDES, SquareExamples, square_image
    from deploy.tiny.tokenizer import COLOURS
    from router.images.processor import ImageProcessor

    model_dir = shipped_dir(preset)
    model, transport = ours(model_dir)
    tower = load_vision_tower(load_vision_config(model_dir), CheckpointReader(model_dir), CPU, torch.float32)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    squares = SquareExamples(tok, ImageProcessor(56), 4, -100)
    rng, wrong = random.Random(HELD_OUT_SEED), []
    for _ in range(30):
        colour, height, width = rng.choice(COLOURS), rng.randint(*SIDES), rng.randint(*SIDES)
        image = squares.processor.tile(square_image(height, width, colour, rng))
        ids = squares.question(image.grid)
        with torch.no_grad():
            embeds_TD = embed_with_images(model, torch.tensor(ids), tower(image.pixels_T3SS), squares.tokens.patch)
            batch = ForwardBatch((SeqSlice(0, len(ids), 0, 0),))
            logits = model(torch.tensor(ids), batch, ContiguousKVCache(), transport, embeds_TD=embeds_TD)
        if tok.decode([int(logits[-1].argmax())]) != colour:
            wrong.append((colour, height, width))
    assert len(wrong) <= 1, wrong  # 30 unseen images (none missed on the machines we ran it on)


@pytest.mark.parametrize("scope, mlp_fp8", [("fp8", False), ("fp8-mlp", True)])
def test_tiny_model_in_the_official_fp8_layout(tmp_path, scope, mlp_fp8):
    from deploy.cli.main import main

    assert main(["tiny-model", str(tmp_path), "--preset", "maverick", "--train-steps", "0", "--quantize", scope]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["format"]) == ("compressed-tensors", "float-quantized")
    assert q["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        up = "language_model.model.layers.1.feed_forward.experts.3.up_proj.weight"
        assert f.get_slice(up).get_dtype() == "F8_E4M3" and f.get_slice(up + "_scale").get_shape() == [64, 1]
        dense = "language_model.model.layers.0.feed_forward.gate_proj.weight"
        assert (f.get_slice(dense).get_dtype() == "F8_E4M3") == mlp_fp8
        assert f.get_slice("language_model.model.layers.0.self_attn.q_proj.weight").get_dtype() == "F32"
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)  # unfused, one set per expert


def test_an_unknown_quantize_scope_is_a_usage_error(tmp_path, capsys):
    from deploy.cli.main import main

    assert main(["tiny-model", str(tmp_path), "--train-steps", "0", "--quantize", "int4"]) == 2
    assert "--quantize: expected one of ['fp8', 'fp8-mlp'], got 'int4'" in capsys.readouterr().err
