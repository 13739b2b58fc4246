"""Images are decoded to RGB uint8 or refused with an InvalidRequest naming the field and saying what is allowed:
truncated, corrupt, zero-size, too many pixels (a decompression bomb is refused from its header, never allocated),
not an image, too many bytes. Headers are read without a decoder, and agree with Pillow's."""

from __future__ import annotations

import io
import resource
import struct
import zlib

import pytest
import torch
from PIL import Image

from router.images.decode import ImageLimits, check_image, decode_image
from router.images.header import read_header
from router.request.errors import InvalidRequest

FIELD = "messages[0].content[1].image"
LIMITS = ImageLimits()


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int, idat: bytes = b"\x00" * 16) -> bytes:
    """A PNG that claims width x height RGB pixels but carries a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(idat))
        + png_chunk(b"IEND", b"")
    )


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    gen = torch.Generator().manual_seed(width * 1000 + height)
    data = torch.randint(0, 256, (height, width, len(mode)), generator=gen, dtype=torch.uint8)
    return Image.frombytes(mode, (width, height), data.numpy().tobytes())


def refused(data, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(InvalidRequest) as err:
        decode_image(data, limits, FIELD)
    assert err.value.field == FIELD
    return str(err.value)


def test_png_decodes_to_rgb_uint8_channels_first():
    image = noise(7, 5)
    pixels = decode_image(encode(image, "PNG"), LIMITS, FIELD)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 5, 7) and pixels.is_contiguous()
    assert pixels.permute(1, 2, 0).flatten().tolist() == list(image.tobytes())


def test_alpha_is_composited_onto_white():
    transparent = Image.new("RGBA", (4, 3), (10, 20, 30, 0))
    assert bool((decode_image(encode(transparent, "PNG"), LIMITS, FIELD) == 255).all())


def test_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (6, 4), color) for color in ((255, 0, 0), (0, 0, 255))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    pixels = decode_image(gif, LIMITS, FIELD)
    assert pixels[:, 0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    "fmt,options",
    [("JPEG", {}), ("JPEG", {"progressive": True}), ("WEBP", {}), ("WEBP", {"lossless": True}), ("GIF", {})],
)
def test_every_supported_format_decodes(fmt, options):
    data = encode(noise(33, 21), fmt, **options)
    assert decode_image(data, LIMITS, FIELD).shape == (3, 21, 33)


BIG_METADATA = {"exif": b"Exif\x00\x00" + b"\x00" * 60000, "comment": b"c" * 5000}  # markers before the frame


@pytest.mark.parametrize(
    "fmt,options",
    [
        ("PNG", {}),
        ("JPEG", BIG_METADATA),
        ("JPEG", {"progressive": True}),
        ("WEBP", {}),
        ("WEBP", {"lossless": True}),
        ("GIF", {}),
    ],
)
def test_header_size_agrees_with_pillow(fmt, options):
    for width, height in ((1, 1), (33, 21), (1000, 3)):
        data = encode(noise(width, height), fmt, **options)
        header = read_header(data)
        assert (header.format, header.width, header.height) == (fmt, width, height)


def test_animated_webp_header_is_read():
    frames = [noise(20, 10), noise(20, 10).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:])
    assert data[12:16] == b"VP8X"
    assert (read_header(data).width, read_header(data).height) == (20, 10)
    assert decode_image(data, LIMITS, FIELD).shape == (3, 10, 20)


def test_truncated_image_is_refused():
    png = encode(noise(64, 64), "PNG")
    assert "truncated or corrupt PNG" in refused(png[: len(png) // 2])
    jpeg = encode(noise(64, 64), "JPEG")
    assert "truncated or corrupt JPEG" in refused(jpeg[: len(jpeg) // 2])
    assert "truncated PNG image" in refused(png[:20])  # cut inside the header


def test_corrupt_pixel_data_is_refused():
    png = bytearray(encode(noise(64, 64), "PNG"))
    png[60:80] = b"\x00" * 20  # inside the compressed pixel data
    assert "corrupt PNG" in refused(bytes(png))


def test_zero_size_is_refused():
    assert "is 0x5 pixels; both sides must be at least 1 pixel" in refused(png_header_only(0, 5))
    assert "is 0x0 pixels" in refused(png_header_only(0, 0))


def test_decompression_bomb_is_refused_from_its_header_without_allocating():
    bomb = png_header_only(100_000, 100_000)  # 30 GB of RGB if decoded
    assert len(bomb) < 100
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    message = refused(bomb)
    assert f"100000x100000 = 10000000000 pixels; at most {LIMITS.max_pixels} pixels are allowed" in message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100_000  # KiB: nothing near 30 GB


def test_pixel_limit_is_checked_before_decoding():
    """The header claims more pixels than allowed and carries no pixel data: the refusal is about the size, so
    the decoder (which would have found the data truncated) never ran."""
    message = refused(png_header_only(2000, 1000), ImageLimits(max_pixels=1_000_000))
    assert "2000x1000 = 2000000 pixels; at most 1000000 pixels are allowed per image" in message


@pytest.mark.parametrize(
    "data", [b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n", b"hello, this is text", b"BM" + b"\x00" * 60]
)
def test_other_kinds_of_file_are_refused(data):
    assert "is not a PNG, JPEG, WEBP or GIF image" in refused(data)


def test_empty_and_non_bytes_are_refused():
    assert "is empty" in refused(b"")
    assert "must be image bytes, got str" in refused("iVBORw0KGgo=")


def test_too_many_bytes_is_refused_before_reading_the_image():
    png = encode(noise(64, 64), "PNG")
    assert f"is {len(png)} bytes; at most 1000 bytes are allowed per image" in refused(png, ImageLimits(max_bytes=1000))


def test_check_image_reads_only_the_header():
    header = check_image(png_header_only(640, 480), LIMITS, FIELD)
    assert (header.format, header.width, header.height) == ("PNG", 640, 480)


def test_pixel_limit_may_not_exceed_pillows_own():
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        ImageLimits(max_pixels=Image.MAX_IMAGE_PIXELS + 1)
