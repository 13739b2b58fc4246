"""What one forward pass is given: a flat batch of new tokens from several sequences, and the KV cache contract.

The router's model runner builds a `ForwardBatch` per step; the model math reads it and never looks at the
scheduler. Legend: T new tokens in the batch (all sequences, concatenated), K kv heads, Dh head_dim, S keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's new tokens in the flat batch: rows [start, start+length) at positions [pos0, pos0+length).

    `slot` names the sequence in the KV cache. `pos0` equals the number of tokens the cache already holds for
    it: Llama 4 positions are cache indices (no padding), so RoPE, the chunk mask and temperature tuning all
    read the same number.
    """

    start: int
    length: int
    pos0: int
    slot: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class ForwardBatch:
    seqs: tuple[SeqSlice, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.seqs)

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.cat([torch.arange(s.pos0, s.pos0 + s.length) for s in self.seqs]).to(device)  # [T]

    def last_rows(self) -> list[int]:
        return [s.end - 1 for s in self.seqs]


class KVCache(Protocol):
    """Per-layer key/value store the attention layers write to and read from.

    `store_and_load` appends a sequence's new k/v (positions [pos0, pos0+t)) for one layer and returns the
    keys and values at positions [lo, pos0+t), where `lo` <= pos0 is the first position the layer can still
    attend to (the start of the current chunk for chunked layers, 0 for global layers).
    """

    def store_and_load(
        self, layer: int, seq: SeqSlice, k_tKD: torch.Tensor, v_tKD: torch.Tensor, lo: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class BatchedKVCache(KVCache, Protocol):
    """A cache that can also serve every sequence of the step at once (one gather per layer, not one per
    sequence). `store_and_load_batch` writes all new k/v [T, K, Dh] and returns, per sequence, its keys and
    values padded to the longest: [N, S, K, Dh] each, and their positions [N, S] (-1 where padded)."""

    def store_and_load_batch(
        self, layer: int, batch: ForwardBatch, k_TKD: torch.Tensor, v_TKD: torch.Tensor, lo: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
