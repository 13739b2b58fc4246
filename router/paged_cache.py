"""Paged KV storage on the router's device, addressed through the block manager's tables.

Per layer one key and one value tensor [blocks, block_size, K, Dh], from the layer's pool: "chunk" for
chunked-attention (RoPE) layers, "full" for global (NoPE) layers. The runner calls `begin_step` with each
sequence's tables; attention then calls `store_and_load`, which writes the new keys/values into their slots
and gathers positions [lo, end) for that sequence.

Legend: t new tokens of one sequence, S gathered positions, K kv heads, Dh head_dim, B blocks, P block_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cluster.batch import ForwardBatch, SeqSlice
from cluster.config import ModelConfig
from router.block_manager import KVBlockManager, SeqBlocks


@dataclass(frozen=True)
class KVLayout:
    """How the KV memory budget is split; computed once at start-up and reported by the engine."""

    block_size: int
    full_blocks: int
    chunk_blocks: int
    full_layers: tuple[int, ...]
    chunk_layers: tuple[int, ...]
    bytes_per_token_per_layer: int

    @property
    def full_bytes_per_token(self) -> int:
        """What one token of context costs in the global layers, for as long as the sequence lives."""
        return len(self.full_layers) * self.bytes_per_token_per_layer

    @property
    def chunk_bytes_per_token(self) -> int:
        """What one token costs in the chunked layers, only while it is in its sequence's current chunk."""
        return len(self.chunk_layers) * self.bytes_per_token_per_layer

    @property
    def token_capacity(self) -> int:
        return self.full_blocks * self.block_size if self.full_layers else self.chunk_blocks * self.block_size

    @property
    def total_bytes(self) -> int:
        return (
            self.full_blocks * self.full_bytes_per_token + self.chunk_blocks * self.chunk_bytes_per_token
        ) * self.block_size


def plan_kv_layout(
    cfg: ModelConfig, budget_bytes: int, block_size: int, max_num_seqs: int, dtype: torch.dtype
) -> KVLayout:
    """Give the chunk pool room for every sequence's current chunk (at most half the budget), the rest to
    the full pool."""
    chunk = cfg.attention_chunk_size
    if chunk is not None:
        block_size = math.gcd(block_size, chunk)  # blocks must not straddle chunks (tiny test chunks only)
    chunk_layers = tuple(i for i, rope in enumerate(cfg.rope_layers) if rope and chunk is not None)
    full_layers = tuple(i for i in range(cfg.num_hidden_layers) if i not in chunk_layers)
    per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    chunk_block_bytes = len(chunk_layers) * per_layer * block_size
    full_block_bytes = len(full_layers) * per_layer * block_size
    chunk_blocks = 0
    if chunk_layers:
        wanted = max_num_seqs * (chunk // block_size)
        cap = budget_bytes // (2 * chunk_block_bytes) if full_layers else budget_bytes // chunk_block_bytes
        chunk_blocks = min(wanted, cap)
    full_blocks = (budget_bytes - chunk_blocks * chunk_block_bytes) // full_block_bytes if full_layers else 0
    return KVLayout(block_size, full_blocks, chunk_blocks, full_layers, chunk_layers, per_layer)


def block_manager_for(layout: KVLayout, chunk_size: int | None) -> KVBlockManager:
    return KVBlockManager(
        layout.block_size,
        layout.full_blocks,
        layout.chunk_blocks,
        chunk_size if layout.chunk_layers else None,
        uses_full=bool(layout.full_layers),
        uses_chunk=bool(layout.chunk_layers),
    )


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, layout: KVLayout, device: torch.device, dtype: torch.dtype):
        self.layout, self.block_size = layout, layout.block_size
        shape = (layout.block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.is_chunk_layer = {i: i in layout.chunk_layers for i in range(cfg.num_hidden_layers)}
        for layer in range(cfg.num_hidden_layers):
            blocks = layout.chunk_blocks if self.is_chunk_layer[layer] else layout.full_blocks
            self.k[layer] = torch.zeros((blocks, *shape), device=device, dtype=dtype)
            self.v[layer] = torch.zeros((blocks, *shape), device=device, dtype=dtype)
        self.device = device
        self._tables: dict[int, SeqBlocks] = {}
        self._memo: dict[tuple, object] = {}

    def begin_step(self, tables: dict[int, SeqBlocks]) -> None:
        """`tables[slot]`: the block tables of the sequence that `SeqSlice.slot` names this step."""
        self._tables = tables
        self._memo: dict[tuple, object] = {}

    def store_and_load(self, layer: int, seq: SeqSlice, k_tKD: torch.Tensor, v_tKD: torch.Tensor, lo: int):
        end = seq.pos0 + seq.length
        new_slots = self._slots(layer, seq.slot, seq.pos0, end)
        read_slots = self._slots(layer, seq.slot, lo, end)
        k_flat = self.k[layer].view(-1, *k_tKD.shape[1:])
        v_flat = self.v[layer].view(-1, *v_tKD.shape[1:])
        k_flat[new_slots] = k_tKD
        v_flat[new_slots] = v_tKD
        return k_flat[read_slots], v_flat[read_slots]

    def store_and_load_batch(
        self, layer: int, batch: ForwardBatch, k_TKD: torch.Tensor, v_TKD: torch.Tensor, lo: tuple[int, ...]
    ):
        """All sequences at once: one write of the step's new k/v, one padded gather (see BatchedKVCache)."""
        chunk_layer = self.is_chunk_layer[layer]
        key = ("batch", chunk_layer, lo)
        if key not in self._memo:
            self._memo[key] = self._batch_slots(chunk_layer, batch, lo)
        new_T, read_NS, pos_NS = self._memo[key]
        k_flat = self.k[layer].view(-1, *k_TKD.shape[1:])
        v_flat = self.v[layer].view(-1, *v_TKD.shape[1:])
        k_flat[new_T] = k_TKD
        v_flat[new_T] = v_TKD
        return k_flat[read_NS], v_flat[read_NS], pos_NS

    def _batch_slots(self, chunk_layer: bool, batch: ForwardBatch, lo: tuple[int, ...]):
        """Built on the host, then one copy each to the device (not one small copy per sequence)."""
        cpu = torch.device("cpu")
        new = [self._compute_slots(chunk_layer, s.slot, s.pos0, s.pos0 + s.length, cpu) for s in batch.seqs]
        reads = [self._compute_slots(chunk_layer, s.slot, a, s.pos0 + s.length, cpu) for s, a in zip(batch.seqs, lo)]
        width = max(len(r) for r in reads)
        read_NS = torch.zeros(len(reads), width, dtype=torch.int64)
        pos_NS = torch.full((len(reads), width), -1, dtype=torch.int64)
        for i, (r, a) in enumerate(zip(reads, lo)):
            read_NS[i, : len(r)] = r
            pos_NS[i, : len(r)] = torch.arange(a, a + len(r))
        return tuple(t.to(self.device, non_blocking=True) for t in (torch.cat(new), read_NS, pos_NS))

    def _slots(self, layer: int, slot: int, start: int, end: int) -> torch.Tensor:
        key = (self.is_chunk_layer[layer], slot, start, end)  # the same for every layer of a pool
        if key not in self._memo:
            self._memo[key] = self._compute_slots(key[0], slot, start, end)
        return self._memo[key]

    def _compute_slots(
        self, chunk_layer: bool, slot: int, start: int, end: int, device: torch.device | None = None
    ) -> torch.Tensor:
        tables = self._tables[slot]
        p = self.block_size
        logical = range(start // p, -(-end // p))
        if chunk_layer:
            physical = [tables.chunk[i] for i in logical]
        else:
            physical = tables.full[logical.start : logical.stop]
        base = torch.tensor(physical, dtype=torch.int64).repeat_interleave(p) * p + torch.arange(p).repeat(
            len(physical)
        )
        first = logical.start * p
        return base[start - first : end - first].to(device or self.device)
