"""Paged KV block bookkeeping (no torch): which physical blocks hold each sequence's keys and values.

Two pools, because Llama 4's layers keep different amounts of context:
  - "full" blocks serve the global-attention (NoPE) layers: a sequence holds blocks for its whole context.
  - "chunk" blocks serve the chunked-attention (RoPE) layers: a position only attends within its
    `chunk_size`-aligned chunk, so blocks of finished chunks are released. The scheduler never schedules a
    piece that crosses a chunk boundary, so a sequence holds at most one chunk of these.
A model without NoPE layers uses only the chunk pool; one without chunked attention only the full pool.

Prefix caching (`caching`): once a completed step has computed every position of a full block, `commit` names the
block in both pools by its chained hash (router/request/block_hash.py). A new sequence's `reuse` attaches the longest
cached prefix that gives exactly the KV a recompute would:
  - the full pool must hold every block of the prefix;
  - the chunk pool must hold the blocks of the chunk in which the prefix ends (from that chunk's start up to the
    prefix's end). Blocks of earlier chunks are never read again, so they are not needed. If the chunk pool lacks
    them, the hit falls back to the prefix's longest run that it does hold from the chunk's start, and at worst to
    the chunk's start: a prefix ending on a chunk boundary needs no chunk-layer KV at all.
Released chunk blocks (finished chunks) and the blocks of finished sequences stay cached while nobody holds them,
and are evicted least recently used first when room is needed (block_pool.py): nothing dead is pinned. A sequence
gives its blocks back last block first, so a prefix's tail is evicted before its head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from router.engine.block_pool import BlockPool


@dataclass
class SeqBlocks:
    full: list[int] = field(default_factory=list)  # logical block i -> physical block
    chunk: dict[int, int] = field(default_factory=dict)  # logical block i -> physical, current chunk only
    committed: int = 0  # leading blocks named by their hashes (hits included)


class KVBlockManager:
    def __init__(
        self,
        block_size: int,
        full_blocks: int,
        chunk_blocks: int,
        chunk_size: int | None,
        uses_full: bool,
        uses_chunk: bool,
        caching: bool = False,
    ):
        assert chunk_size is None or chunk_size % block_size == 0, (chunk_size, block_size)
        self.block_size, self.chunk_size = block_size, chunk_size
        self.uses_full, self.uses_chunk, self.caching = uses_full, uses_chunk, caching
        self.full, self.chunk = BlockPool(full_blocks), BlockPool(chunk_blocks)
        self.seqs: dict[str, SeqBlocks] = {}

    def max_tokens_alone(self) -> int:
        """The longest context one sequence can have with the whole cache to itself."""
        return self.full.num_blocks * self.block_size if self.uses_full else 2**62

    def allocate(self, seq_id: str, num_computed: int, num_new: int) -> bool:
        """Make room for positions [num_computed, num_computed + num_new); False (and no change) if full."""
        blocks = self.seqs.setdefault(seq_id, SeqBlocks())
        end_block = -(-(num_computed + num_new) // self.block_size)
        need_full = max(0, end_block - len(blocks.full)) if self.uses_full else 0
        chunk_ids = self._chunk_window(num_computed, num_new)
        missing_chunk = [i for i in chunk_ids if i not in blocks.chunk] if self.uses_chunk else []
        if need_full > self.full.num_free or len(missing_chunk) > self.chunk.num_free:
            if not blocks.full and not blocks.chunk:
                del self.seqs[seq_id]
            return False
        blocks.full += self.full.take(need_full)
        blocks.chunk.update(zip(missing_chunk, self.chunk.take(len(missing_chunk))))
        return True

    def reuse(self, seq_id: str, hashes: Sequence[bytes]) -> int:
        """Attach the longest usable cached prefix of `hashes` (the sequence's full-block hashes, stopping short of
        its last token) to a sequence holding no blocks; the tokens it covers (0: no hit, nothing attached)."""
        assert seq_id not in self.seqs, seq_id
        n = self._hit_blocks(hashes) if self.caching else 0
        if n == 0:
            return 0
        blocks = self.seqs[seq_id] = SeqBlocks(committed=n)
        if self.uses_full:
            blocks.full = [self.full.lookup(h) for h in hashes[:n]]
            for block in blocks.full:
                self.full.acquire(block)
        if self.uses_chunk:
            blocks.chunk = {i: self.chunk.lookup(hashes[i]) for i in range(self._chunk_start(n), n)}
            for block in blocks.chunk.values():
                self.chunk.acquire(block)
        return n * self.block_size

    def _hit_blocks(self, hashes: Sequence[bytes]) -> int:
        n = len(hashes)
        if self.uses_full:
            n = next((i for i, h in enumerate(hashes) if self.full.lookup(h) is None), n)
        if not self.uses_chunk or n == 0:
            return n
        start = end = self._chunk_start(n)
        while end < n and self.chunk.lookup(hashes[end]) is not None:
            end += 1
        return end if self.uses_full or end > start else 0  # without global layers, claim only KV found

    def _chunk_start(self, n_blocks: int) -> int:
        """The first block of the chunk in which a prefix of `n_blocks` blocks ends (the prefix itself if aligned)."""
        tokens = n_blocks * self.block_size
        return (tokens // self.chunk_size) * self.chunk_size // self.block_size

    def commit(self, seq_id: str, hashes: Sequence[bytes]) -> None:
        """Name the sequence's blocks that `hashes` covers: only blocks whose every position a completed step
        computed (a step that failed or is replayed registers nothing)."""
        blocks = self.seqs.get(seq_id)
        if not self.caching or blocks is None:
            return
        for i in range(blocks.committed, len(hashes)):
            if self.uses_full:
                self.full.register(blocks.full[i], hashes[i])
            if i in blocks.chunk:
                self.chunk.register(blocks.chunk[i], hashes[i])
        blocks.committed = max(blocks.committed, len(hashes))

    def release_finished_chunks(self, seq_id: str, next_position: int) -> None:
        """Free chunk blocks before the chunk that `next_position` falls in: nothing will attend to them."""
        blocks = self.seqs.get(seq_id)
        if blocks is None or self.chunk_size is None:
            return
        first_live = (next_position // self.chunk_size) * self.chunk_size // self.block_size
        dead = [i for i in blocks.chunk if i < first_live]
        self.chunk.give_back(blocks.chunk.pop(i) for i in dead)

    def free(self, seq_id: str) -> None:
        blocks = self.seqs.pop(seq_id, None)
        if blocks is not None:
            self.full.give_back(reversed(blocks.full))
            self.chunk.give_back([blocks.chunk[i] for i in sorted(blocks.chunk, reverse=True)])

    def tables(self, seq_id: str) -> SeqBlocks:
        return self.seqs[seq_id]

    def _chunk_window(self, num_computed: int, num_new: int) -> range:
        if self.chunk_size is None:
            return range(0)
        lo = (num_computed // self.chunk_size) * self.chunk_size
        return range(lo // self.block_size, -(-(num_computed + num_new) // self.block_size))

    @property
    def blocks_used(self) -> int:
        return (self.full.num_blocks - self.full.num_free) + (self.chunk.num_blocks - self.chunk.num_free)

    @property
    def cached_blocks(self) -> int:
        """Blocks named by a hash, held or not (both pools)."""
        return self.full.num_cached + self.chunk.num_cached

    @property
    def evictions(self) -> int:
        return self.full.evictions + self.chunk.evictions

    @property
    def blocks_total(self) -> int:
        return self.full.num_blocks + self.chunk.num_blocks
