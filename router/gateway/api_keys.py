"""The gateway's API keys: where they come from and the one check made on every call. No grpc here, so that the
config can read and check the key file when it loads.

Sources (both may be given; their keys add up; neither: authentication is off):
  gateway.api_keys_file   one key per line; blank lines and `#` comments (whole-line or after the key) are ignored
  $MOECLUSTER_API_KEYS    comma-separated
Never the command line: it is visible to every user of the machine (ps, /proc/PID/cmdline).

A key is at least 16 visible ASCII characters (no spaces): what an HTTP/2 header carries unchanged, and long
enough that guessing is hopeless. Errors say where a bad key is (file and line) but never repeat it. A presented
key is compared with every known key in constant time (SHA-256 digests, so its length leaks nothing either).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

ENV = "MOECLUSTER_API_KEYS"
MIN_LENGTH = 16
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


class ApiKeyError(ValueError):
    """A key source that cannot be used; the message names the source and line, never the key."""


def check_key(key: str, where: str) -> str:
    if not _VISIBLE_ASCII.fullmatch(key):
        raise ApiKeyError(f"{where}: expected a key of visible ASCII characters (no spaces or control characters)")
    if len(key) < MIN_LENGTH:
        raise ApiKeyError(f"{where}: a key of {len(key)} characters; expected at least {MIN_LENGTH}")
    return key


def parse_key_lines(text: str, where: str) -> list[str]:
    """The keys of a key file's text: one per line, `#` comments and blank lines skipped."""
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        if len(words) > 1 and not words[1].startswith("#"):
            raise ApiKeyError(f"{where}: line {number}: expected one key per line (a comment after it starts with #)")
        keys.append(check_key(words[0], f"{where}: line {number}"))
    return keys


def read_key_file(path: str | os.PathLike) -> list[str]:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ApiKeyError(f"cannot read the key file {str(path)!r}: {getattr(e, 'strerror', None) or e}") from None
    keys = parse_key_lines(text, str(path))
    if not keys:
        raise ApiKeyError(f"{path}: no key in the file (one key per line; # starts a comment)")
    return keys


def parse_key_list(value: str, where: str = ENV) -> list[str]:
    """Comma-separated keys, e.g. from $MOECLUSTER_API_KEYS."""
    parts = [part.strip() for part in value.split(",") if part.strip()]
    return [check_key(part, f"{where}: key {i + 1}") for i, part in enumerate(parts)]


class ApiKeys:
    """The set of accepted keys, kept as SHA-256 digests."""

    def __init__(self, keys: Iterable[str]):
        self._digests = tuple({_digest(key) for key in keys})
        assert self._digests, "ApiKeys needs at least one key (None means authentication is off)"

    @classmethod
    def load(cls, path: str | None, environ: Mapping[str, str]) -> ApiKeys | None:
        """The keys from the file and the environment; None if neither names any."""
        keys = read_key_file(path) if path else []
        keys += parse_key_list(environ.get(ENV, ""))
        return cls(keys) if keys else None

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, key: str) -> bool:
        digest, found = _digest(key), False
        for known in self._digests:  # no early exit: the time does not depend on which key matched
            found |= hmac.compare_digest(known, digest)
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
