"""Decodes one image from a request into RGB uint8 pixels, refusing what the server will not take.

Checked in order, each before any work it guards: the byte count, the format (PNG, JPEG, WebP, GIF; by magic bytes,
and Pillow is then allowed only that one decoder), the header's size (zero sides, too many pixels), then Pillow's
own reading of the size (which must agree), and only then the pixels are decoded. Every refusal is an
`InvalidRequest` naming the request field and saying what is allowed. `max_pixels` may not exceed Pillow's
`MAX_IMAGE_PIXELS`, so Pillow's decompression-bomb check never trips on an image these limits accept; its error is
still turned into a refusal should it trip.

Conversion to RGB is transformers' (`convert_to_rgb`): images with alpha or a transparent palette entry are
composited onto white; everything else goes through Pillow's `convert("RGB")`. A GIF or animated WebP gives its first
frame. EXIF orientation is not applied (transformers does not either).
"""

from __future__ import annotations

import io
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from router.images.header import HeaderError, ImageHeader, read_header
from router.request.errors import InvalidRequest

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000  # width * height; 8000 x 6000 fits

    def __post_init__(self):
        pillow_max = Image.MAX_IMAGE_PIXELS or self.max_pixels  # None: Pillow checks nothing
        if not 0 < self.max_pixels <= pillow_max:
            raise ValueError(
                f"max_pixels must be in [1, {pillow_max}] (Pillow's MAX_IMAGE_PIXELS), got {self.max_pixels}"
            )
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")


def check_image(data: bytes, limits: ImageLimits, field: str = "image") -> ImageHeader:
    """The image's format and size from its header, after every check that needs no decoding."""
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidRequest(field, f"must be image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidRequest(field, "is empty; send a PNG, JPEG, WebP or GIF image")
    if len(data) > limits.max_bytes:
        raise InvalidRequest(field, f"is {len(data)} bytes; at most {limits.max_bytes} bytes are allowed per image")
    try:
        header = read_header(bytes(data))
    except HeaderError as e:
        raise InvalidRequest(field, f"{e}; send a PNG, JPEG, WebP or GIF image") from None
    _check_size(header.width, header.height, limits, field)
    return header


def decode_image(data: bytes, limits: ImageLimits, field: str = "image") -> torch.Tensor:
    """RGB uint8 [3, H, W] (contiguous), or InvalidRequest naming `field`."""
    header = check_image(data, limits, field)
    with _refusing_decoder_errors(header.format, limits, field):
        image = Image.open(io.BytesIO(data), formats=[header.format])  # reads the header only
    if image.size != (header.width, header.height):
        raise InvalidRequest(
            field,
            f"is a malformed {header.format} image: its header says {header.width}x"
            f"{header.height}, the decoder found {image.size[0]}x{image.size[1]}",
        )
    _check_size(*image.size, limits, field)
    with _refusing_decoder_errors(header.format, limits, field):
        return _pixels(_to_rgb(image))


@contextmanager
def _refusing_decoder_errors(fmt: str, limits: ImageLimits, field: str):
    try:
        yield
    except Image.DecompressionBombError:
        raise InvalidRequest(field, f"has too many pixels; at most {limits.max_pixels} are allowed") from None
    except UnidentifiedImageError:
        raise InvalidRequest(field, f"is a corrupt {fmt} image; send a complete PNG, JPEG, WebP or GIF image") from None
    except _DECODE_ERRORS as e:
        raise InvalidRequest(
            field, f"is a truncated or corrupt {fmt} image ({e}); send a complete PNG, JPEG, WebP or GIF image"
        ) from None


def _check_size(width: int, height: int, limits: ImageLimits, field: str) -> None:
    if width < 1 or height < 1:
        raise InvalidRequest(field, f"is {width}x{height} pixels; both sides must be at least 1 pixel")
    if width * height > limits.max_pixels:
        raise InvalidRequest(
            field,
            f"is {width}x{height} = {width * height} pixels; at most {limits.max_pixels} pixels are allowed per image",
        )


def _pixels(rgb: Image.Image) -> torch.Tensor:
    hw3 = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3)
    return hw3.permute(2, 0, 1).contiguous()


def _to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb for Pillow images; the decoding happens here."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
