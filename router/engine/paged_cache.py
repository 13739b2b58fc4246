"""Paged KV storage on the router's device, addressed through the block manager's tables.

Per layer one key and one value tensor [blocks, block_size, K, Dh], from the layer's pool: "chunk" for
chunked-attention (RoPE) layers, "full" for global (NoPE) layers. The engine calls `begin_step` with each
sequence's tables; attention then calls `store_and_load` (one sequence) or `store_and_load_batch` (all of a
batch), which write the new keys/values into their slots and gather positions [lo, end).

The block tables live on the device (`DeviceBlockTables`), one row per sequence of the step, and `begin_step`
writes only what changed since the previous step (a block gained, a sequence new or recomputed), so a decode step
usually copies nothing. The slots of a batch are then computed on the device from the tables and a few numbers
per sequence, one small copy and a dozen tensor ops per pool, whatever the batch size: no per-sequence tensors.

Legend: t new tokens of one sequence, T of the batch, N sequences, S gathered positions, K kv heads, Dh
head_dim, B blocks, P block_size, L logical blocks of a sequence (the tables' width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from cluster.batch import ForwardBatch, SeqSlice
from cluster.config import ModelConfig
from router.engine.block_manager import KVBlockManager, SeqBlocks


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


def block_manager_for(layout: KVLayout, chunk_size: int | None, caching: bool = False) -> KVBlockManager:
    return KVBlockManager(
        layout.block_size,
        layout.full_blocks,
        layout.chunk_blocks,
        chunk_size if layout.chunk_layers else None,
        uses_full=bool(layout.full_layers),
        uses_chunk=bool(layout.chunk_layers),
        caching=caching,
    )


@dataclass
class _Mirrored:
    """What a table row holds of one sequence's SeqBlocks (a preempted sequence gets a new SeqBlocks object)."""

    blocks: SeqBlocks
    full: int = 0  # entries of blocks.full written
    chunk_hi: int = -1  # the highest logical chunk block written


@dataclass
class DeviceBlockTables:
    """Both pools' block tables on the device, [rows, L] int32 (logical block -> physical), a row per sequence
    of the current step, grown on demand. Chunk blocks keep their logical index: entries of released chunks stay
    behind unread (reads never reach before the current chunk)."""

    device: torch.device
    full_RL: torch.Tensor = None
    chunk_RL: torch.Tensor = None
    row_of: dict[int, int] = field(default_factory=dict)  # slot -> row
    mirrored: dict[int, _Mirrored] = field(default_factory=dict)  # row -> what it holds

    def __post_init__(self):
        self.full_RL = torch.zeros(8, 16, dtype=torch.int32, device=self.device)
        self.chunk_RL = torch.zeros(8, 16, dtype=torch.int32, device=self.device)

    def sync(self, tables: dict[int, SeqBlocks]) -> None:
        """Rows for exactly these sequences (slot -> tables); writes the entries they gained."""
        for slot in [s for s in self.row_of if s not in tables]:  # finished, preempted, or not scheduled
            self.mirrored.pop(self.row_of.pop(slot))
        full, chunk = [], []  # (row, logical, physical) to write
        for slot, blocks in tables.items():
            if slot not in self.row_of:
                self.row_of[slot] = min(set(range(len(self.row_of) + 1)) - set(self.row_of.values()))
            row = self.row_of[slot]
            held = self.mirrored.get(row)
            if held is None or held.blocks is not blocks:
                held = self.mirrored[row] = _Mirrored(blocks, 0, min(blocks.chunk, default=0) - 1)
            full += [(row, i, blocks.full[i]) for i in range(held.full, len(blocks.full))]
            held.full = len(blocks.full)
            while held.chunk_hi + 1 in blocks.chunk:
                held.chunk_hi += 1
                chunk.append((row, held.chunk_hi, blocks.chunk[held.chunk_hi]))
        self.full_RL, self.chunk_RL = _write(self.full_RL, full), _write(self.chunk_RL, chunk)

    def pool(self, chunk_layer: bool) -> torch.Tensor:
        return self.chunk_RL if chunk_layer else self.full_RL


def _write(table_RL: torch.Tensor, entries: list[tuple[int, int, int]]) -> torch.Tensor:
    """The table with the entries written (one copy to the device), grown (doubled) first if they do not fit."""
    if not entries:
        return table_RL
    rows, width = max(e[0] for e in entries) + 1, max(e[1] for e in entries) + 1
    if rows > table_RL.shape[0] or width > table_RL.shape[1]:
        grown = table_RL.new_zeros(_at_least(table_RL.shape[0], rows), _at_least(table_RL.shape[1], width))
        grown[: table_RL.shape[0], : table_RL.shape[1]] = table_RL
        table_RL = grown
    row_col_block = torch.tensor(entries, dtype=torch.int64).to(table_RL.device, non_blocking=True)
    table_RL[row_col_block[:, 0], row_col_block[:, 1]] = row_col_block[:, 2].to(torch.int32)
    return table_RL


def _at_least(size: int, wanted: int) -> int:
    while size < wanted:
        size *= 2
    return size


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
        self.tables = DeviceBlockTables(device)
        self._memo: dict[tuple, object] = {}

    def begin_step(self, tables: dict[int, SeqBlocks]) -> None:
        """`tables[slot]`: the block tables of the sequence that `SeqSlice.slot` names this step."""
        self.tables.sync(tables)
        self._memo = {}

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
        """All sequences at once: one write of the step's new k/v, one padded gather (see BatchedKVCache). A step
        may run several batches (micro-batches), each with slots of its own."""
        chunk_layer = self.is_chunk_layer[layer]
        key = ("batch", id(batch), chunk_layer, lo)  # the batch lives until the step ends
        if key not in self._memo:
            self._memo[key] = self._batch_slots(chunk_layer, batch, lo)
        new_T, read_NS, pos_NS = self._memo[key]
        k_flat = self.k[layer].view(-1, *k_TKD.shape[1:])
        v_flat = self.v[layer].view(-1, *v_TKD.shape[1:])
        k_flat[new_T] = k_TKD
        v_flat[new_T] = v_TKD
        return k_flat[read_NS], v_flat[read_NS], pos_NS

    def _batch_slots(self, chunk_layer: bool, batch: ForwardBatch, lo: tuple[int, ...]):
        """New tokens' slots [T], and each sequence's positions [lo, end) padded to the longest: slots [N, S]
        (0 where padded) and positions [N, S] (-1 where padded)."""
        seqs, row_of = batch.seqs, self.tables.row_of
        per_seq = [(row_of[s.slot], s.start, s.length, s.pos0, a) for s, a in zip(seqs, lo)]
        width = max(s.pos0 + s.length - a for s, a in zip(seqs, lo))
        row_N, start_N, len_N, pos0_N, lo_N = torch.tensor(per_seq).to(self.device, non_blocking=True).unbind(1)
        table_RL = self.tables.pool(chunk_layer)
        seq_T = torch.repeat_interleave(len_N, output_size=batch.num_tokens)  # the sequence of each new token
        pos_T = pos0_N[seq_T] - start_N[seq_T] + torch.arange(batch.num_tokens, device=self.device)
        end_N1 = (pos0_N + len_N)[:, None]
        pos_NS = lo_N[:, None] + torch.arange(width, device=self.device)
        valid_NS = pos_NS < end_N1
        read_NS = self._slot(table_RL, row_N[:, None], torch.minimum(pos_NS, end_N1 - 1)).where(valid_NS, 0)
        return self._slot(table_RL, row_N[seq_T], pos_T), read_NS, pos_NS.where(valid_NS, -1)

    def _slots(self, layer: int, slot: int, start: int, end: int) -> torch.Tensor:
        key = (self.is_chunk_layer[layer], slot, start, end)  # the same for every layer of a pool
        if key not in self._memo:
            positions = torch.arange(start, end, device=self.device)
            self._memo[key] = self._slot(self.tables.pool(key[0]), self.tables.row_of[slot], positions)
        return self._memo[key]

    def _slot(self, table_RL: torch.Tensor, row, pos: torch.Tensor) -> torch.Tensor:
        """The cache slot of position `pos` of the sequence in table row `row` (broadcast together)."""
        p = self.block_size
        return table_RL[row, pos // p].long() * p + pos % p
