"""Image prompt expansion equals transformers' Llama4Processor expansion token for token, and the counts the gateway
uses match the ids it builds."""

from __future__ import annotations

import re

import pytest

from router.images.tokens import (
    LLAMA4_IMAGE_TOKENS,
    ImageTokens,
    expand_image_placeholders,
    image_token_count,
    image_token_ids,
    patches_per_tile,
)
from router.request.errors import InvalidRequest

GRIDS = [(1, 1), (1, 2), (2, 1), (2, 3), (3, 5), (4, 4), (8, 2), (1, 16)]


def transformers_expansion(grid: tuple[int, int], n_patches: int) -> list[int]:
    """transformers' own string expansion, mapped to the real tokenizer's ids."""
    processing = pytest.importorskip("transformers.models.llama4.processing_llama4")
    text = processing.Llama4Processor._prompt_split_image(None, grid, n_patches)  # uses no processor state
    ids = {f"<|{name}|>": getattr(LLAMA4_IMAGE_TOKENS, name) for name in ImageTokens.__dataclass_fields__}
    tokens = re.findall(r"<\|[a-z_]+\|>", text)
    assert "".join(tokens) == text
    return [ids[t] for t in tokens]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("n_patches", [144, 4])
def test_expansion_equals_transformers(grid, n_patches):
    assert image_token_ids(grid, n_patches, LLAMA4_IMAGE_TOKENS) == transformers_expansion(grid, n_patches)


@pytest.mark.parametrize("grid", GRIDS)
def test_token_count_matches_the_ids(grid):
    assert image_token_count(grid, 144) == len(image_token_ids(grid, 144, LLAMA4_IMAGE_TOKENS))


def test_reference_counts():
    assert image_token_count((1, 1), 144) == 147
    assert image_token_count((2, 3), 144) == 1017


def test_patches_per_tile():
    assert patches_per_tile(336, 14, 0.5) == 144
    assert patches_per_tile(56, 14, 0.5) == 4


def test_placeholders_are_replaced_in_order():
    t = LLAMA4_IMAGE_TOKENS
    ids = [1, 5, t.image, 6, t.image, 7]
    out = expand_image_placeholders(ids, [(1, 1), (2, 1)], 2, t)
    first, second = image_token_ids((1, 1), 2, t), image_token_ids((2, 1), 2, t)
    assert out == [1, 5, *first, 6, *second, 7]


def test_placeholder_and_image_counts_must_agree():
    t = LLAMA4_IMAGE_TOKENS
    with pytest.raises(InvalidRequest) as err:
        expand_image_placeholders([1, t.image, 2], [(1, 1), (1, 1)], 144, t)
    assert err.value.field == "messages" and "1 image placeholders (<|image|>) but 2 images" in str(err.value)


def test_tokens_from_a_tokenizer_lookup():
    vocab = {
        "<|image_start|>": 200080,
        "<|image_end|>": 200081,
        "<|tile_x_separator|>": 200084,
        "<|tile_y_separator|>": 200085,
        "<|image|>": 200090,
        "<|patch|>": 200092,
    }
    assert ImageTokens.from_tokenizer(vocab.get) == LLAMA4_IMAGE_TOKENS
    del vocab["<|patch|>"]
    with pytest.raises(ValueError, match=r"no <\|patch\|>"):
        ImageTokens.from_tokenizer(vocab.get)
