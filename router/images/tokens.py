"""Llama 4's image tokens in a prompt: each `<|image|>` placeholder the chat template rendered becomes

    <|image_start|>
      (only when rows * cols > 1) for each row: for each col: <|patch|> * N, <|tile_x_separator|> between cols;
                                  then <|tile_y_separator|>
      <|image|> <|patch|> * N          (the global tile, or the only tile)
    <|image_end|>

with N `<|patch|>` tokens per tile (144 for Llama 4: (image_size / patch_size)^2 * pixel_shuffle_ratio^2), exactly as
transformers' Llama4Processor expands it. Only the `<|patch|>` positions take image features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from router.request.errors import InvalidRequest


@dataclass(frozen=True)
class ImageTokens:
    """The tokenizer's ids of the image special tokens."""

    image_start: int
    image_end: int
    tile_x_separator: int
    tile_y_separator: int
    image: int  # the chat template's placeholder, and the global tile's marker
    patch: int  # config.json's image_token_index: the rows that take image features

    @classmethod
    def from_tokenizer(cls, token_id: Callable[[str], int | None]) -> ImageTokens:
        """From a token -> id lookup (router.request.tokenizer.Tokenizer.token_id); ValueError names any token
        missing."""
        ids = {f.name: token_id(f"<|{f.name}|>") for f in fields(cls)}
        missing = [f"<|{name}|>" for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the tokenizer has no {', '.join(missing)}: not a Llama 4 vision tokenizer")
        return cls(**ids)


LLAMA4_IMAGE_TOKENS = ImageTokens(
    image_start=200080, image_end=200081, tile_x_separator=200084, tile_y_separator=200085, image=200090, patch=200092
)


def patches_per_tile(image_size: int, patch_size: int, pixel_shuffle_ratio: float) -> int:
    """N, as transformers' processor computes it."""
    return (image_size // patch_size) ** 2 // round(1 / pixel_shuffle_ratio**2)


def image_token_ids(grid: tuple[int, int], n_patches: int, tokens: ImageTokens) -> list[int]:
    """The tokens one image with this (rows, cols) grid takes in the prompt."""
    rows, cols = grid
    ids = [tokens.image_start]
    if rows * cols > 1:
        for _ in range(rows):
            for col in range(cols):
                ids += [tokens.patch] * n_patches
                if col < cols - 1:
                    ids.append(tokens.tile_x_separator)
            ids.append(tokens.tile_y_separator)
    ids += [tokens.image] + [tokens.patch] * n_patches + [tokens.image_end]
    return ids


def image_token_count(grid: tuple[int, int], n_patches: int) -> int:
    """len(image_token_ids(grid, n_patches, ...)) without building it: 3 + N, plus R * Q * N + R * Q separators."""
    tiles = grid[0] * grid[1]
    return 3 + n_patches + (tiles * (n_patches + 1) if tiles > 1 else 0)


def expand_image_placeholders(
    ids: Sequence[int], grids: Sequence[tuple[int, int]], n_patches: int, tokens: ImageTokens, field: str = "messages"
) -> list[int]:
    """`ids` with its i-th `<|image|>` replaced by image i's tokens; InvalidRequest naming `field` when the
    placeholders and the images differ in number."""
    placeholders = sum(1 for t in ids if t == tokens.image)
    if placeholders != len(grids):
        raise InvalidRequest(
            field,
            f"has {placeholders} image placeholders (<|image|>) but {len(grids)} images; "
            f"give one image content part per image",
        )
    out: list[int] = []
    images = iter(grids)
    for t in ids:
        out.extend(image_token_ids(next(images), n_patches, tokens) if t == tokens.image else [t])
    return out
