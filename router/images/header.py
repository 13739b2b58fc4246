"""An image's format and size read from its first bytes, before any decoder runs: PNG, JPEG, WebP and GIF.

The gateway uses it to refuse oversized or malformed images and to count an image's prompt tokens without
decoding. Only the fixed header fields are read (for JPEG, the markers up to the first frame header), so the cost
does not depend on the image's size. The decoder later confirms the size it finds is the same.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
PILLOW_MAX_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS: Pillow refuses to decode more (a test checks the number)
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # not C4/C8/CC
_JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xD9)}  # TEM, RST0-7, SOI


@dataclass(frozen=True)
class ImageHeader:
    format: str  # one of FORMATS, as Pillow names them
    width: int
    height: int


class HeaderError(ValueError):
    """Bytes that are not a supported image, or whose header is cut short or malformed."""


def sniff_format(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def read_header(data: bytes) -> ImageHeader:
    fmt = sniff_format(data)
    if fmt is None:
        raise HeaderError(f"is not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} image")
    try:
        width, height = _SIZE_READERS[fmt](data)
    except (struct.error, IndexError):
        raise HeaderError(f"is a truncated {fmt} image (its header is cut short)") from None
    return ImageHeader(fmt, width, height)


def _png_size(data: bytes) -> tuple[int, int]:
    if data[12:16] != b"IHDR":
        raise HeaderError("is a malformed PNG image (no IHDR chunk first)")
    return struct.unpack_from(">II", data, 16)


def _gif_size(data: bytes) -> tuple[int, int]:
    return struct.unpack_from("<HH", data, 6)


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: a key frame's start code, then 14-bit sizes
        if data[23:26] != b"\x9d\x01\x2a":
            raise HeaderError("is a malformed WebP image (no VP8 start code)")
        w, h = struct.unpack_from("<HH", data, 26)
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":  # lossless: signature 0x2f, then 14-bit (size - 1) fields
        if data[20] != 0x2F:
            raise HeaderError("is a malformed WebP image (bad VP8L signature)")
        bits = struct.unpack_from("<I", data, 21)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: 24-bit (canvas size - 1) fields
        w, h = data[24:27], data[27:30]
        if len(h) < 3:
            raise IndexError
        return int.from_bytes(w, "little") + 1, int.from_bytes(h, "little") + 1
    raise HeaderError(f"is a malformed WebP image (unknown first chunk {chunk!r})")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    pos = 2
    while True:
        if data[pos] != 0xFF:
            raise HeaderError("is a malformed JPEG image (a marker was expected)")
        while data[pos] == 0xFF:  # fill bytes
            pos += 1
        marker = data[pos]
        pos += 1
        if marker in _JPEG_NO_LENGTH:
            continue
        if marker in (0xDA, 0xD9):  # scan data or end of image before any frame header
            raise HeaderError("is a malformed JPEG image (no frame header before the image data)")
        if marker in _JPEG_SOF:
            height, width = struct.unpack_from(">HH", data, pos + 3)  # after length (2) and precision (1)
            return width, height
        pos += struct.unpack_from(">H", data, pos)[0]


_SIZE_READERS = {"PNG": _png_size, "JPEG": _jpeg_size, "WEBP": _webp_size, "GIF": _gif_size}
