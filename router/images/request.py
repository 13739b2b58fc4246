"""How a request's images enter its prompt: each image's header is checked (bytes, format, sides, pixels: no
decoding), its tile grid chosen, and its `<|image|>` placeholder expanded to the image's tokens, so every
prompt-length check (context length, max_tokens, the KV cache) counts them. The gateway does this before admission,
with its configured limits; the engine does it again for whatever reaches it (it never trusts its caller), with
only the hard limits, so a request the gateway admitted is never refused there.

A relayed request's images carry their grids and its ids hold their tokens already (router/request/messages.py,
ImageInput): then only the agreement of the two is checked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cluster.checkpoint import CheckpointReader
from cluster.vision.config import VisionConfig
from cluster.vision.weights import vision_config_of
from router.images.decode import ImageLimits
from router.images.header import PILLOW_MAX_PIXELS
from router.images.processor import ImageProcessor
from router.images.tiles import MAX_TILES
from router.images.tokens import ImageTokens, expand_image_placeholders, image_token_count
from router.request.errors import InvalidRequest
from router.request.messages import ImageInput
from router.request.tokenizer import Tokenizer

log = logging.getLogger(__name__)
HARD_LIMITS = ImageLimits(max_bytes=2**31 - 1, max_pixels=PILLOW_MAX_PIXELS)


@dataclass(frozen=True)
class VisionPrompt:
    """A vision model's image tokens and the limits its images meet. Built by the engine from the checkpoint and by
    the gateway from the router's model info and its own limits."""

    tokens: ImageTokens
    patches_per_tile: int  # N `<|patch|>` tokens per tile (144 for Llama 4)
    processor: ImageProcessor  # tile size, most tiles, and the byte and pixel limits
    max_images: int | None = None  # per request; None: only the context length bounds them

    @classmethod
    def for_model(
        cls, cfg: VisionConfig, token_id: Callable[[str], int | None], limits: ImageLimits = HARD_LIMITS, **kw
    ) -> VisionPrompt:
        """ValueError when the tokenizer lacks an image token or disagrees with config.json about `<|patch|>`."""
        tokens = ImageTokens.from_tokenizer(token_id)
        if tokens.patch != cfg.image_token_id:
            raise ValueError(
                f"config.json's image_token_index is {cfg.image_token_id} but the tokenizer's <|patch|> is "
                f"{tokens.patch}; they must be the same token"
            )
        return cls(tokens, cfg.patches_per_tile, ImageProcessor(cfg.image_size, MAX_TILES, limits), **kw)

    def image_tokens(self, grid: tuple[int, int]) -> int:
        return image_token_count(grid, self.patches_per_tile)

    def patch_rows(self, grid: tuple[int, int]) -> int:
        """Image feature rows (= `<|patch|>` tokens) of an image with this grid: N per tile, global tile included."""
        tiles = grid[0] * grid[1]
        return self.patches_per_tile * (tiles + 1 if tiles > 1 else 1)

    def expand(
        self, ids: Sequence[int], images: Sequence[ImageInput], field: str
    ) -> tuple[list[int], tuple[ImageInput, ...]]:
        """The prompt ids with every image's tokens in place, and the images with their grids; InvalidRequest naming
        the image's field (or the prompt's, `field`) otherwise."""
        self._check_count(images)
        relayed = [im.grid is not None for im in images]
        if any(relayed) and not all(relayed):
            raise InvalidRequest(images[0].field, "either every image carries its grid or none does")
        gridded = tuple(replace(im, grid=self._grid(im)) for im in images)
        out = (
            list(ids)
            if all(relayed)
            else expand_image_placeholders(ids, [im.grid for im in gridded], self.patches_per_tile, self.tokens, field)
        )
        found, expected = out.count(self.tokens.patch), sum(self.patch_rows(im.grid) for im in gridded)
        if found != expected:
            raise InvalidRequest(
                field,
                f"holds {found} <|patch|> tokens but its images need {expected}; <|patch|> may appear only in an "
                "image's own tokens",
            )
        return out, gridded

    def _check_count(self, images: Sequence[ImageInput]) -> None:
        if self.max_images is not None and len(images) > self.max_images:
            raise InvalidRequest(
                images[self.max_images].field,
                f"is image {self.max_images + 1} of {len(images)}; at most {self.max_images} images are allowed "
                "per request",
            )

    def _grid(self, image: ImageInput) -> tuple[int, int]:
        grid = self.processor.check(image.data, image.field)
        if image.grid is not None and tuple(image.grid) != grid:
            raise InvalidRequest(image.field, f"carries the grid {image.grid}, but its size gives {grid}")
        return grid


def checkpoint_vision(
    model_dir: str | Path, reader: CheckpointReader, tokenizer: Tokenizer | None
) -> VisionPrompt | None:
    """The engine's VisionPrompt for a checkpoint (hard limits only); None when it takes no images."""
    cfg = vision_config_of(model_dir, reader)
    if cfg is None:
        return None
    if tokenizer is None:
        log.warning("%s has a vision tower but no tokenizer.json: images are refused", model_dir)
        return None
    return VisionPrompt.for_model(cfg, tokenizer.token_id)
