"""Images given as `data:` URLs (RFC 2397): `data:image/png;base64,iVBOR...`. Only data URLs are taken: the server
never fetches a network URL (that would let a client make the server reach any host it can, and stall on it)."""

from __future__ import annotations

import base64
import binascii
import urllib.parse

from router.request.errors import InvalidRequest

SCHEME = "data:"


def data_url_bytes(url: str, field: str) -> bytes:
    """The bytes a base64 `data:image/...` URL holds; InvalidRequest naming `field` for anything else."""
    if not url.startswith(SCHEME):
        scheme = url.split(":", 1)[0] if ":" in url else url[:16]
        raise InvalidRequest(
            field,
            f"only data: URLs are accepted (data:image/png;base64,...), got {scheme!r}; the server never fetches a "
            "URL: send the image's bytes instead",
        )
    header, sep, payload = url[len(SCHEME) :].partition(",")
    params = [p.strip().lower() for p in header.split(";")]
    if not sep or "base64" not in params[1:]:
        raise InvalidRequest(field, "must be a base64 data URL: data:image/<type>;base64,<data>")
    if params[0] and not params[0].startswith("image/"):
        raise InvalidRequest(field, f"has media type {params[0]!r}; expected an image/* type")
    try:
        return base64.b64decode(urllib.parse.unquote(payload), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(field, f"holds invalid base64 data ({e})") from None
