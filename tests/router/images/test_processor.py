"""Preprocessing equals transformers' Llama4ImageProcessor (torchvision backend) bit for bit: the grid, every tile's
bf16 bytes, for images of the reference's shapes in both orientations, one smaller than a tile, one with alpha and
one grey; and the grid and resize target for 6,392 sizes. The references come from
tests/fixtures/make_vision_fixtures.py, run where torchvision can be installed."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from router.images.processor import ImageProcessor
from router.images.tiles import image_grid, resized_size
from tests.fixtures.vision_images import IMAGES, make_png, pixel_digest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "vision" / "preprocess.safetensors"


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES)


def tile_digests(pixels_T3SS: torch.Tensor) -> list[bytes]:
    return [hashlib.sha256(t.contiguous().view(torch.int16).numpy().tobytes()).digest() for t in pixels_T3SS]


@pytest.mark.parametrize("name", list(IMAGES))
def test_tiles_equal_transformers_bit_for_bit(reference, name):
    png = make_png(name)
    assert pixel_digest(png) == bytes(reference[f"{name}.image_sha256"].tolist()), "the test image itself differs"
    out = ImageProcessor().preprocess(png)
    rows, cols = reference[f"{name}.grid"].tolist()
    assert out.grid == (rows, cols)
    assert out.num_tiles == rows * cols + (rows * cols > 1) == reference[f"{name}.tile_sums"].shape[0]
    assert out.pixels_T3SS.dtype == torch.bfloat16 and out.pixels_T3SS.shape[1:] == (3, 336, 336)
    assert torch.equal(out.pixels_T3SS.double().sum(dim=(1, 2, 3)), reference[f"{name}.tile_sums"])
    sampled = out.pixels_T3SS.flatten()[reference[f"{name}.positions"]]
    assert torch.equal(sampled.view(torch.int16), reference[f"{name}.values"].view(torch.int16))
    assert tile_digests(out.pixels_T3SS) == [bytes(d) for d in reference[f"{name}.tile_sha256"].tolist()]


def test_reference_grid_examples():
    assert image_grid(width=300, height=200) == (1, 1)
    assert image_grid(width=800, height=500) == (2, 3)
    assert image_grid(width=1920, height=1080) == (3, 5)
    assert image_grid(width=400, height=3000) == (8, 2)
    assert image_grid(width=100, height=80) == (1, 1)


def test_grid_and_resize_target_equal_transformers_for_many_sizes(reference):
    table = reference["sizes"].tolist()
    assert len(table) > 6000
    got = []
    for h, w, *_ in table:
        grid = image_grid(width=w, height=h)
        got.append([h, w, *grid, *resized_size(h, w, grid)])
    assert got == table


def test_fixtures_were_made_by_the_pinned_reference():
    with safe_open(str(FIXTURES), "pt") as f:
        meta = f.metadata()
    assert meta["transformers"] == "5.24.0" and meta["torchvision"].startswith("0.29.1")


def test_global_tile_only_when_the_grid_has_several_tiles():
    small = ImageProcessor().preprocess(make_png("h80_w100"))
    assert small.grid == (1, 1) and small.num_tiles == 1
    large = ImageProcessor().preprocess(make_png("h500_w800"))
    assert large.grid == (2, 3) and large.num_tiles == 7


def test_padding_is_minus_one_after_normalisation():
    out = ImageProcessor().preprocess(make_png("h200_w300"))  # fitted to 224 x 336 in one 336 tile
    assert bool((out.pixels_T3SS[0, :, 224:, :] == -1).all())
    assert not bool((out.pixels_T3SS[0, :, 223, :] == -1).all())


def test_check_gives_the_grid_from_the_header_alone():
    png = make_png("h1080_w1920")
    header_only = png[:33]  # signature + IHDR: no pixel data at all
    processor = ImageProcessor()
    assert processor.check(header_only) == processor.preprocess(png).grid == (3, 5)


@pytest.mark.parametrize("fmt,options", [("JPEG", {"quality": 90}), ("WEBP", {"lossless": True}), ("GIF", {})])
def test_other_formats_tile_like_their_decoded_pixels(fmt, options):
    rgb = Image.open(io.BytesIO(make_png("h500_w800"))).convert("RGB")
    encoded = io.BytesIO()
    rgb.save(encoded, format=fmt, **options)
    decoded = Image.open(io.BytesIO(encoded.getvalue())).convert("RGB")
    as_png = io.BytesIO()
    decoded.save(as_png, format="PNG")
    processor = ImageProcessor()
    got, expected = processor.preprocess(encoded.getvalue()), processor.preprocess(as_png.getvalue())
    assert got.grid == expected.grid == (2, 3)
    assert torch.equal(got.pixels_T3SS, expected.pixels_T3SS)
