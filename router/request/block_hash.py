"""What names a full KV block for prefix caching (no torch): a chained hash of its parent block's hash, its token
ids, and extra keys. Shared by the router's block manager and the gateway's cache-affinity routing, so both name a
prompt's blocks alike.

  hash(block i) = sha256(hash(block i-1) | token ids of block i | content hashes of the images in block i)
  hash(block -1) = sha256("moecluster-kv" | cache_salt)

- Chained: a block's KV depends on every token before it, so equal hashes mean equal prefixes.
- Images: every image's tokens are the same `<|patch|>` ids whatever the picture; the sha256 of each image whose
  patch tokens fall in a block is part of that block's key (two pictures behind the same text never share KV).
- `cache_salt`: the root differs per salt, so requests with different salts share no block (tenant isolation).
Only full blocks are named; a partial last block is never shared.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ROOT = b"moecluster-kv-v1"


def root_hash(cache_salt: str | None) -> bytes:
    salt = b"" if cache_salt is None else b"\x01" + cache_salt.encode()
    return hashlib.sha256(ROOT + salt).digest()


def block_hash(parent: bytes, token_ids: Sequence[int], extra: Sequence[bytes] = ()) -> bytes:
    h = hashlib.sha256(parent)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    for key in extra:
        h.update(len(key).to_bytes(4, "little"))
        h.update(key)
    return h.digest()


def image_digest(data: bytes) -> bytes:
    """An image's content hash (the same one the feature cache keys on)."""
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class ImageSpan:
    """One image's `<|patch|>` positions [start, end) in the prompt, and its content hash."""

    start: int
    end: int
    digest: bytes


def image_spans(prompt_ids: Sequence[int], patch_id: int, rows: Sequence[int], digests: Sequence[bytes]):
    """Each image's span of patch positions: the prompt's `<|patch|>` positions split by the images' row counts."""
    positions = [i for i, t in enumerate(prompt_ids) if t == patch_id]
    assert sum(rows) == len(positions) and len(rows) == len(digests), (rows, len(positions), len(digests))
    spans, first = [], 0
    for n, digest in zip(rows, digests):
        if n:
            spans.append(ImageSpan(positions[first], positions[first + n - 1] + 1, digest))
        first += n
    return tuple(spans)


class BlockHashes:
    """The chained hashes of one sequence's full blocks, extended as its tokens become known (`hashes[i]` names
    block i)."""

    def __init__(self, block_size: int, cache_salt: str | None = None, images: Sequence[ImageSpan] = ()):
        self.block_size, self.images = block_size, tuple(images)
        self.root = root_hash(cache_salt)
        self.hashes: list[bytes] = []

    def extend(self, token: Callable[[int], int], num_tokens: int) -> list[bytes]:
        """Hash every full block within the first `num_tokens` tokens (`token(i)` gives token i); the hashes."""
        p = self.block_size
        for i in range(len(self.hashes), num_tokens // p):
            parent = self.hashes[-1] if self.hashes else self.root
            ids = [token(j) for j in range(i * p, (i + 1) * p)]
            self.hashes.append(block_hash(parent, ids, self._extra(i * p, (i + 1) * p)))
        return self.hashes

    def _extra(self, lo: int, hi: int) -> list[bytes]:
        return [s.digest for s in self.images if s.start < hi and s.end > lo]


def request_hashes(
    block_size: int,
    cache_salt: str | None,
    prompt_ids: Sequence[int],
    patch_id: int | None = None,
    image_rows: Sequence[int] = (),
    image_data: Sequence[bytes] = (),
) -> BlockHashes:
    """A request's block hashes, empty so far: its images' spans (each image's `<|patch|>` rows, in prompt order)
    and content hashes taken from its prompt. The gateway and the router build them alike."""
    spans = image_spans(prompt_ids, patch_id, image_rows, [image_digest(d) for d in image_data]) if image_rows else ()
    return BlockHashes(block_size, cache_salt, spans)


def prompt_block_hashes(
    prompt_ids: Sequence[int], block_size: int, cache_salt: str | None, images: Sequence[ImageSpan] = (), limit=None
) -> list[bytes]:
    """The hashes of a prompt's first full blocks (at most `limit`)."""
    n = len(prompt_ids) if limit is None else min(len(prompt_ids), limit * block_size)
    return BlockHashes(block_size, cache_salt, images).extend(prompt_ids.__getitem__, n)
