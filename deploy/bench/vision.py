"""`moecluster bench vision`: time the vision tower (encoder + adapter + projector) at Llama 4 Scout's shape, random
weights: one tile, and a 16-tile image (a 1080 x 1920 photo: a 3 x 5 grid plus the global tile).

Legend: T tiles, N = 144 image tokens per tile, D = 5120 text hidden.
"""

from __future__ import annotations

import statistics
import time

import torch

from cluster.vision.config import VisionConfig
from cluster.vision.model import VisionTower

SCOUT = VisionConfig(
    hidden_size=1408,
    num_hidden_layers=34,
    num_attention_heads=16,
    intermediate_size=5632,
    num_channels=3,
    image_size=336,
    patch_size=14,
    pixel_shuffle_ratio=0.5,
    projector_input_dim=4096,
    projector_output_dim=4096,
    vision_output_dim=4096,
    rope_theta=10000.0,
    text_hidden_size=5120,
    image_token_id=200092,
    boi_token_id=200080,
    eoi_token_id=200081,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def random_tower(cfg: VisionConfig, device: torch.device, dtype: torch.dtype) -> VisionTower:
    with torch.device("meta"):
        tower = VisionTower(cfg)
    tower = tower.to_empty(device=device).to(dtype)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "layernorm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.02, generator=gen)
    return tower.eval().requires_grad_(False)


def time_encode(tower: VisionTower, tiles: int, iters: int) -> float:
    """Median seconds for one forward over `tiles` tiles (after one warm-up)."""
    cfg, device = tower.config, tower.device
    pixels_T3SS = torch.rand(tiles, 3, cfg.image_size, cfg.image_size, device=device).mul_(2).sub_(1)
    samples = []
    with torch.inference_mode():
        for i in range(iters + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            features = tower(pixels_T3SS)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                samples.append(time.perf_counter() - start)
    assert features.shape == (tiles * cfg.patches_per_tile, cfg.text_hidden_size)
    return statistics.median(samples)


def run_vision_bench(device: str = "cpu", dtype: str = "float32", tile_counts=(1, 16), iters: int = 1) -> list[tuple]:
    """Prints and returns rows (tiles, image tokens, seconds, ms per tile)."""
    dev = torch.device(device)
    tower = random_tower(SCOUT, dev, DTYPES[dtype])
    params = sum(p.numel() for p in tower.parameters())
    print(
        f"Llama 4 Scout vision tower: {params / 1e6:.0f}M parameters, {dtype}, {dev}, {torch.get_num_threads()} "
        f"threads; median of {iters} after a warm-up"
    )
    print(f"{'tiles':>6} {'tokens':>7} {'seconds':>9} {'ms/tile':>9}")
    rows = []
    for tiles in tile_counts:
        seconds = time_encode(tower, tiles, iters)
        rows.append((tiles, tiles * SCOUT.patches_per_tile, seconds, seconds / tiles * 1e3))
        print(f"{rows[-1][0]:>6} {rows[-1][1]:>7} {seconds:>9.2f} {rows[-1][3]:>9.0f}")
    return rows


def run_encode_bench(args) -> int:
    run_vision_bench(args.device, args.dtype, tuple(args.tiles), args.iters)
    return 0
