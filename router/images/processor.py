"""Llama 4's image preprocessing: request bytes in, bf16 tiles for the vision tower and the tile grid out.

Created by the gateway (one per server, from the model's vision config), used per image: `check` (header only) to
refuse bad images and count prompt tokens before any decoding, then `preprocess` for the pixels. Equals transformers'
Llama4ImageProcessor (torchvision backend) bit for bit on the same decoded image; router/images/tiles.py says how.

Legend: T tiles (R * Q, plus the global tile when R * Q > 1), S tile side, H, W image height and width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from router.images.decode import ImageLimits, check_image, decode_image
from router.images.tiles import MAX_TILES, TILE_SIZE, best_grid, normalize, pad, resize, resized_size, split_tiles


@dataclass(frozen=True)
class ProcessedImage:
    """What the vision tower needs for one image (`pixels_T3SS`) and what the prompt expansion needs (`grid`)."""

    pixels_T3SS: torch.Tensor  # bf16 in [-1, 1]: the grid's tiles row-major, then the global tile if R * Q > 1
    grid: tuple[int, int]  # (rows, cols)

    @property
    def num_tiles(self) -> int:
        return self.pixels_T3SS.shape[0]


@dataclass(frozen=True)
class ImageProcessor:
    tile_size: int = TILE_SIZE  # the vision config's image_size
    max_tiles: int = MAX_TILES
    limits: ImageLimits = field(default_factory=ImageLimits)

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) for an image of this size; needs only the header."""
        return best_grid(height, width, self.tile_size, self.max_tiles)

    def check(self, data: bytes, field: str = "image") -> tuple[int, int]:
        """The grid of an image after the checks that need no decoding; InvalidRequest naming `field` otherwise."""
        header = check_image(data, self.limits, field)
        return self.grid(header.width, header.height)

    def preprocess(self, data: bytes, field: str = "image") -> ProcessedImage:
        """Decode (InvalidRequest naming `field` on any refusal), then tile."""
        return self.tile(decode_image(data, self.limits, field))

    def tile(self, image_3HW: torch.Tensor) -> ProcessedImage:
        """Tiles of an RGB uint8 image [3, H, W]."""
        assert image_3HW.dtype == torch.uint8 and image_3HW.dim() == 3 and image_3HW.shape[0] == 3, image_3HW.shape
        height, width = image_3HW.shape[1:]
        s = self.tile_size
        grid = best_grid(height, width, s, self.max_tiles)
        fitted_3HW = resize(image_3HW, *resized_size(height, width, grid, s))
        tiles_T3SS = split_tiles(normalize(pad(fitted_3HW, grid[0] * s, grid[1] * s)), grid, s)
        if grid[0] * grid[1] > 1:
            global_13SS = normalize(resize(image_3HW, s, s))[None]
            tiles_T3SS = torch.cat([tiles_T3SS, global_13SS])
        return ProcessedImage(tiles_T3SS, grid)
