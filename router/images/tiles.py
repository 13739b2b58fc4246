"""Llama 4's image tiling, as transformers' Llama4ImageProcessor computes it (reference/llama4-vision.md,
"Preprocessing"), without torchvision.

The grid: of every canvas of rows x cols tiles with rows * cols <= max_tiles, take the one needing the least
upscaling, else the least downscaling, then the smaller area. The image is resized into it keeping its aspect ratio
(upscaled only when smaller than a tile), padded right and bottom with 0, normalised in bfloat16 to [-1, 1] and cut
into tiles row-major; a grid of more than one tile is followed by the whole image squeezed into one global tile.

Where transformers computes in float32 (its candidate canvases are a tensor), so do we: the scales, and the resize
arithmetic on a side bounded by the canvas. Otherwise a size like 1080 * (1680 / 1920) can floor one pixel apart.
The resize is torchvision's: bilinear with antialias on uint8, natively where torchvision does it natively
(AVX2/AVX512/Arm CPUs), else through float32 and rounding.

Legend: H, W image height and width; R, Q grid rows and cols; S tile side; T tiles.
"""

from __future__ import annotations

import math
import platform
import struct
from collections import defaultdict
from functools import lru_cache

import torch
import torch.nn.functional as F

TILE_SIZE = 336
MAX_TILES = 16


@lru_cache(maxsize=8)
def candidate_grids(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """(rows, cols) with rows * cols <= max_tiles, in transformers' order (which breaks exact ties)."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for n in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio[rows / (n // rows)].append((rows, n // rows))
    return tuple(grid for grids in by_ratio.values() for grid in grids)


def best_grid(height: int, width: int, tile: int = TILE_SIZE, max_tiles: int = MAX_TILES) -> tuple[int, int]:
    """(rows, cols) of the canvas an image of this size is fitted into."""
    grids = torch.tensor(candidate_grids(max_tiles))
    canvas_G2 = grids * tile
    scales_G = torch.minimum(canvas_G2[:, 0] / height, canvas_G2[:, 1] / width)  # float32, as transformers
    up_G = scales_G >= 1
    chosen = scales_G[up_G].min() if up_G.any() else scales_G[~up_G].max()
    tied = (scales_G == chosen).nonzero()[:, 0]
    areas = canvas_G2[tied, 0] * canvas_G2[tied, 1]
    rows, cols = grids[tied[torch.argmin(areas)]].tolist()
    return rows, cols


def image_grid(width: int, height: int, tile: int = TILE_SIZE, max_tiles: int = MAX_TILES) -> tuple[int, int]:
    """(rows, cols) for an image of this size, from its header alone; the image gets rows * cols tiles, plus the
    global tile when rows * cols > 1."""
    return best_grid(height, width, tile, max_tiles)


def resized_size(height: int, width: int, grid: tuple[int, int], tile: int = TILE_SIZE) -> tuple[int, int]:
    """(h, w) the image is resized to inside a grid's canvas: each side bounded by max(side, tile) and the canvas,
    aspect kept, floor on the scaled side."""
    bound_h, f32_h = _bound(height, grid[0] * tile, tile)
    bound_w, f32_w = _bound(width, grid[1] * tile, tile)
    scale_h = _f32(bound_h / height) if f32_h else bound_h / height
    scale_w = _f32(bound_w / width) if f32_w else bound_w / width
    w_limits = _f32(scale_w) < _f32(scale_h) if f32_h or f32_w else scale_w < scale_h  # a tensor compares in f32
    if w_limits:
        return max(min(_floor_scaled(height, scale_w, f32_w), bound_h), 1), max(bound_w, 1)
    return max(bound_h, 1), max(min(_floor_scaled(width, scale_h, f32_h), bound_w), 1)


def _bound(side: int, canvas: int, tile: int) -> tuple[int, bool]:
    """min(max(side, tile), canvas), and whether transformers holds it as its canvas tensor (float32 from there)."""
    return (canvas, True) if canvas < max(side, tile) else (max(side, tile), False)


def _f32(x: float) -> float:
    """x rounded to float32 (exact emulation: Python's float64 result of one operation on float32 values, rounded
    once more, equals float32 arithmetic)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _floor_scaled(side: int, scale: float, in_f32: bool) -> int:
    return math.floor(_f32(side * scale) if in_f32 else side * scale)


def resize(image_3HW: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's resize of a uint8 image: bilinear, antialias, no corner alignment."""
    if tuple(image_3HW.shape[-2:]) == (height, width):
        return image_3HW
    x_13HW = image_3HW[None].contiguous()
    if _native_uint8_bilinear():
        out = F.interpolate(x_13HW, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    else:
        out = (
            F.interpolate(x_13HW.float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True)
            .round_()
            .to(torch.uint8)
        )
    return out[0]


def _native_uint8_bilinear() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def normalize(image_3HW: torch.Tensor) -> torch.Tensor:
    """uint8 -> bfloat16 in [-1, 1], each step rounded to bfloat16 as transformers does: x * (1/255), - 0.5, / 0.5."""
    return (image_3HW.to(torch.bfloat16) * (1 / 255) - 0.5) / 0.5


def pad(image_3HW: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero padding on the right and bottom up to (height, width)."""
    return F.pad(image_3HW, (0, width - image_3HW.shape[-1], 0, height - image_3HW.shape[-2]))


def split_tiles(image_3HW: torch.Tensor, grid: tuple[int, int], tile: int) -> torch.Tensor:
    """[3, R*S, Q*S] -> [R*Q, 3, S, S], row-major."""
    rows, cols = grid
    blocks = image_3HW.reshape(3, rows, tile, cols, tile)
    return blocks.permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
