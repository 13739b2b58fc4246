"""Tiny Llama4ForConditionalGeneration checkpoints written by transformers (the oracle), and the reference forward.

transformers 5.24's Llama4ForConditionalGeneration.forward raises on every call, so the reference is composed as
its forward would compute it: vision_model -> multi_modal_projector -> masked_scatter into the input embeddings at
`<|patch|>` -> language_model(inputs_embeds=...) (reference/llama4-vision.md, "Pitfalls").
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from deploy.tiny.model import VISION_FIELDS
from router.images.tokens import ImageTokens
from tests.conftest import BASE_CONFIG

TOKENS = ImageTokens(image_start=301, image_end=302, tile_x_separator=303, tile_y_separator=304, image=305, patch=300)


def make_hf_vlm(seed: int = 0, **text_overrides):
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
    text = {**BASE_CONFIG, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, **text_overrides}
    cfg = transformers.Llama4Config(
        vision_config=copy.deepcopy(VISION_FIELDS),  # the tiny model's tower: 4 `<|patch|>` tokens per tile
        text_config=text,
        image_token_index=TOKENS.patch,
        boi_token_index=TOKENS.image_start,
        eoi_token_index=TOKENS.image_end,
    )
    torch.manual_seed(seed)
    model = transformers.Llama4ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def save_hf_vlm(model, out: Path, max_shard_size: str | None = None) -> Path:
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return out


@torch.no_grad()
def hf_image_features(hf, pixels_T3SS: torch.Tensor) -> torch.Tensor:
    features_TNA = hf.vision_model(pixels_T3SS).last_hidden_state
    return hf.multi_modal_projector(features_TNA.flatten(0, 1))


@torch.no_grad()
def hf_prompt_embeds(hf, ids: list[int], pixels_T3SS: torch.Tensor) -> torch.Tensor:
    ids_1T = torch.tensor([ids])
    embeds_1TD = hf.get_input_embeddings()(ids_1T)
    mask_1TD = (ids_1T == TOKENS.patch)[..., None].expand_as(embeds_1TD)
    return embeds_1TD.masked_scatter(mask_1TD, hf_image_features(hf, pixels_T3SS))


@torch.no_grad()
def hf_logits(hf, embeds_1TD: torch.Tensor) -> torch.Tensor:
    return hf.language_model(inputs_embeds=embeds_1TD).logits[0]


@torch.no_grad()
def hf_greedy(hf, ids: list[int], pixels_T3SS: torch.Tensor, n: int) -> list[int]:
    """Greedy tokens by full recomputation each step (no cache): the simplest correct decode."""
    embeds_1TD, out = hf_prompt_embeds(hf, ids, pixels_T3SS), []
    for _ in range(n):
        out.append(int(hf_logits(hf, embeds_1TD)[-1].argmax()))
        next_11D = hf.get_input_embeddings()(torch.tensor([[out[-1]]]))
        embeds_1TD = torch.cat([embeds_1TD, next_11D], dim=1)
    return out
