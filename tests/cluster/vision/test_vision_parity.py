"""The vision tower, projector and image-merged text forward match transformers' Llama4ForConditionalGeneration:
fp32 features and logits within 1e-5, greedy tokens identical, for one tile, a grid with its global tile, and two
images in one prompt; from one safetensors file or shards."""

from __future__ import annotations

import pytest
import torch

from cluster.batch import ForwardBatch, SeqSlice
from cluster.checkpoint import CheckpointError, CheckpointReader
from cluster.vision.config import load_vision_config
from cluster.vision.merge import embed_with_images
from cluster.vision.weights import has_vision_tower, load_vision_tower
from router.images.processor import ImageProcessor
from router.images.tokens import expand_image_placeholders
from router.reference.contiguous_cache import ContiguousKVCache
from tests.cluster.checkpoint_edits import edited_copy
from tests.cluster.test_llama4_parity import load_ours
from tests.cluster.vision.tiny_vlm import (
    TOKENS,
    hf_greedy,
    hf_image_features,
    hf_logits,
    hf_prompt_embeds,
    make_hf_vlm,
    save_hf_vlm,
)
from tests.fixtures.vision_images import make_pixels

CPU = torch.device("cpu")
PROCESSOR = ImageProcessor(tile_size=56)
N_PATCHES = 4
SHAPES = {"one tile": (40, 50), "2x3 grid + global": (100, 160)}  # (height, width) of 56-pixel tiles
PROMPTS = {  # text around the images; TOKENS.image marks where each image goes
    "one tile": ([1, 17, 33, TOKENS.image, 250, 9, 44], ["one tile"]),
    "2x3 grid + global": ([1, 17, TOKENS.image, 250, 9], ["2x3 grid + global"]),
    "two images": ([1, 17, TOKENS.image, 60, 61, TOKENS.image, 9], ["2x3 grid + global", "one tile"]),
}


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    hf = make_hf_vlm(seed=0)
    path = save_hf_vlm(hf, tmp_path_factory.mktemp("vlm") / "ckpt")
    return path, hf


def image(shape_name: str, seed: int):
    h, w = SHAPES[shape_name]
    return PROCESSOR.tile(make_pixels(h, w, 3, seed).permute(2, 0, 1).contiguous())


def prompt(case: str) -> tuple[list[int], torch.Tensor]:
    """Token ids with each image expanded, and every image's tiles in prompt order (fp32)."""
    text, names = PROMPTS[case]
    images = [image(name, seed) for seed, name in enumerate(names)]
    ids = expand_image_placeholders(text, [im.grid for im in images], N_PATCHES, TOKENS)
    return ids, torch.cat([im.pixels_T3SS for im in images]).float()


def load_all(path):
    model, transport = load_ours(path)
    tower = load_vision_tower(load_vision_config(path), CheckpointReader(path), CPU, torch.float32)
    return model, transport, tower


@torch.inference_mode()
def our_logits(model, transport, tower, ids, pixels_T3SS) -> torch.Tensor:
    ids_T = torch.tensor(ids)
    embeds_TD = embed_with_images(model, ids_T, tower(pixels_T3SS), TOKENS.patch)
    batch = ForwardBatch((SeqSlice(0, len(ids), 0, 0),))
    return model(ids_T, batch, ContiguousKVCache(), transport, all_logits=True, embeds_TD=embeds_TD)


@torch.inference_mode()
def our_greedy(model, transport, tower, ids, pixels_T3SS, n: int) -> list[int]:
    """Prefill with image embeddings, then decode token by token through the KV cache."""
    ids_T, cache = torch.tensor(ids), ContiguousKVCache()
    embeds_TD = embed_with_images(model, ids_T, tower(pixels_T3SS), TOKENS.patch)
    logits = model(ids_T, ForwardBatch((SeqSlice(0, len(ids), 0, 0),)), cache, transport, embeds_TD=embeds_TD)
    out, pos = [int(logits[-1].argmax())], len(ids)
    while len(out) < n:
        logits = model(torch.tensor(out[-1:]), ForwardBatch((SeqSlice(0, 1, pos, 0),)), cache, transport)
        out.append(int(logits[-1].argmax()))
        pos += 1
    return out


def test_prompts_hold_the_expected_tiles_and_patch_tokens():
    for case, tiles in (("one tile", 1), ("2x3 grid + global", 7), ("two images", 8)):
        ids, pixels_T3SS = prompt(case)
        assert pixels_T3SS.shape == (tiles, 3, 56, 56)
        assert ids.count(TOKENS.patch) == tiles * N_PATCHES


def test_image_features_match_transformers(vlm):
    path, hf = vlm
    *_, tower = load_all(path)
    _, pixels_T3SS = prompt("two images")
    with torch.inference_mode():
        got = tower(pixels_T3SS)
    expected = hf_image_features(hf, pixels_T3SS)
    assert got.shape == (8 * N_PATCHES, 64)
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", list(PROMPTS))
def test_logits_with_images_match_transformers(vlm, case):
    path, hf = vlm
    ids, pixels_T3SS = prompt(case)
    expected = hf_logits(hf, hf_prompt_embeds(hf, ids, pixels_T3SS))
    got = our_logits(*load_all(path), ids, pixels_T3SS)
    assert got.shape == expected.shape == (len(ids), 320)
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", list(PROMPTS))
def test_greedy_32_tokens_with_images_match_transformers(vlm, case):
    path, hf = vlm
    ids, pixels_T3SS = prompt(case)
    assert our_greedy(*load_all(path), ids, pixels_T3SS, 32) == hf_greedy(hf, ids, pixels_T3SS, 32)


def test_images_change_the_logits(vlm):
    """Guards the parity tests against an image path that is silently ignored."""
    path, _ = vlm
    model, transport, tower = load_all(path)
    ids, pixels_T3SS = prompt("one tile")
    assert not torch.allclose(
        our_logits(model, transport, tower, ids, pixels_T3SS),
        our_logits(model, transport, tower, ids, pixels_T3SS.flip(-1)),
    )


def test_sharded_checkpoint_gives_the_same_tower(vlm, tmp_path):
    path, hf = vlm
    sharded = save_hf_vlm(hf, tmp_path / "sharded", max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").is_file()
    reader = CheckpointReader(sharded)
    assert has_vision_tower(reader)
    tower = load_vision_tower(load_vision_config(sharded), reader, CPU, torch.float32)
    ids, pixels_T3SS = prompt("two images")
    expected = our_logits(*load_all(path), ids, pixels_T3SS)
    assert torch.equal(our_logits(*load_ours(sharded), tower, ids, pixels_T3SS), expected)


def test_text_only_checkpoint_has_no_vision_tower(hf_checkpoint):
    path, _ = hf_checkpoint()
    assert load_vision_config(path) is None
    assert not has_vision_tower(CheckpointReader(path))


def test_missing_vision_tensor_names_the_key(vlm, tmp_path):
    path, _ = vlm
    dst = edited_copy(
        path, tmp_path / "missing", lambda tensors: tensors.pop("vision_model.model.layers.1.self_attn.k_proj.bias")
    )
    with pytest.raises(CheckpointError, match=r"'vision_model\.model\.layers\.1\.self_attn\.k_proj\.bias' is missing"):
        load_vision_tower(load_vision_config(dst), CheckpointReader(dst), CPU, torch.float32)


def test_tower_runs_in_bfloat16_close_to_fp32(vlm):
    path, _ = vlm
    cfg, reader = load_vision_config(path), CheckpointReader(path)
    _, pixels_T3SS = prompt("2x3 grid + global")
    with torch.inference_mode():
        fp32 = load_vision_tower(cfg, reader, CPU, torch.float32)(pixels_T3SS)
        bf16 = load_vision_tower(cfg, reader, CPU, torch.bfloat16)(pixels_T3SS.bfloat16())
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - fp32).abs().max().item() < 0.05 * fp32.abs().max().item()


def test_reader_keeps_vision_keys_as_stored_and_prefixes_text_keys(vlm):
    path, _ = vlm
    reader = CheckpointReader(path)
    assert reader.key("vision_model.class_embedding") == "vision_model.class_embedding"
    assert reader.key("multi_modal_projector.linear_1.weight") == "multi_modal_projector.linear_1.weight"
    assert reader.key("model.norm.weight") == "language_model.model.norm.weight"
    assert "vision_model.class_embedding" in reader and "model.norm.weight" in reader
