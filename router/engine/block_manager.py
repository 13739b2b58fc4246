"""Paged KV block bookkeeping (no torch): which physical blocks hold each sequence's keys and values.

Two pools, because Llama 4's layers keep different amounts of context:
  - "full" blocks serve the global-attention (NoPE) layers: a sequence holds blocks for its whole context.
  - "chunk" blocks serve the chunked-attention (RoPE) layers: a position only attends within its
    `chunk_size`-aligned chunk, so blocks of finished chunks are released. The scheduler never schedules a
    piece that crosses a chunk boundary, so a sequence holds at most one chunk of these.
A model without NoPE layers uses only the chunk pool; one without chunked attention only the full pool.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        assert n <= len(self._free), (n, len(self._free))
        return [self._free.popleft() for _ in range(n)]

    def give_back(self, ids) -> None:
        self._free.extend(ids)


@dataclass
class SeqBlocks:
    full: list[int] = field(default_factory=list)  # logical block i -> physical block
    chunk: dict[int, int] = field(default_factory=dict)  # logical block i -> physical, current chunk only


class KVBlockManager:
    def __init__(
        self,
        block_size: int,
        full_blocks: int,
        chunk_blocks: int,
        chunk_size: int | None,
        uses_full: bool,
        uses_chunk: bool,
    ):
        assert chunk_size is None or chunk_size % block_size == 0, (chunk_size, block_size)
        self.block_size, self.chunk_size = block_size, chunk_size
        self.uses_full, self.uses_chunk = uses_full, uses_chunk
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
            self.full.give_back(blocks.full)
            self.chunk.give_back(blocks.chunk.values())

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
    def blocks_total(self) -> int:
        return self.full.num_blocks + self.chunk.num_blocks
