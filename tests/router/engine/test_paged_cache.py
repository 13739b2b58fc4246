"""The paged KV cache: the batched attention path (one padded SDPA per layer) gives the per-sequence
reference path's logits on mixed batches (prefill pieces, decodes, chunk crossings), and the KV budget is
split between the chunk and full pools as documented."""

from __future__ import annotations

import pytest
import torch

from cluster.batch import ForwardBatch, SeqSlice
from router.engine.block_manager import SeqBlocks
from router.engine.paged_cache import PagedKVCache, plan_kv_layout
from router.reference.decode import Generator
from tests.conftest import make_hf_model


class PerSequenceOnly:
    """The same cache without its batch method: attention falls back to one sequence at a time."""

    def __init__(self, cache: PagedKVCache):
        self.cache = cache

    def store_and_load(self, *args):
        return self.cache.store_and_load(*args)


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    path = tmp_path_factory.mktemp("paged")
    make_hf_model(seed=9, num_experts_per_tok=2).save_pretrained(path)  # chunk 8, NoPE layer 3
    return Generator.from_checkpoint(path)


def run_steps(generator, cache_view, cache: PagedKVCache, steps):
    tables = {
        0: SeqBlocks(full=list(range(0, 12)), chunk={}),
        1: SeqBlocks(full=list(range(12, 24)), chunk={}),
        2: SeqBlocks(full=list(range(24, 36)), chunk={}),
    }
    chunk_free = list(range(cache.layout.chunk_blocks))
    out = []
    for pieces in steps:  # pieces: (slot, pos0, length, first token id)
        for slot, pos0, length, _ in pieces:  # chunk blocks for this piece's chunk window (none released here)
            for b in range((pos0 // 8) * 8 // 4, -(-(pos0 + length) // 4)):
                if b not in tables[slot].chunk:
                    tables[slot].chunk[b] = chunk_free.pop()
        seqs, ids, start = [], [], 0
        for slot, pos0, length, first in pieces:
            seqs.append(SeqSlice(start, length, pos0, slot))
            ids += range(first, first + length)
            start += length
        cache.begin_step(tables)
        with torch.inference_mode():
            out.append(
                generator.model(
                    torch.tensor(ids),
                    ForwardBatch(tuple(seqs)),
                    cache_view,
                    generator.runner.experts,
                    all_logits=True,
                )
            )
    return torch.cat(out)


def test_batched_attention_equals_the_per_sequence_reference(generator):
    cfg = generator.config
    layout = plan_kv_layout(cfg, 1 << 20, 4, 8, torch.float32)
    steps = [
        [(0, 0, 7, 10), (1, 0, 3, 50)],  # two prefills of different lengths
        [(0, 7, 1, 90), (1, 3, 9, 60), (2, 0, 1, 5)],  # a decode crossing into chunk 1, a prefill across it
        [(0, 8, 1, 91), (1, 12, 1, 61), (2, 1, 12, 6)],
        [(2, 13, 1, 7)],  # alone: the reference path in both runs
    ]
    a = PagedKVCache(cfg, layout, torch.device("cpu"), torch.float32)
    b = PagedKVCache(cfg, layout, torch.device("cpu"), torch.float32)
    batched = run_steps(generator, a, a, steps)
    reference = run_steps(generator, PerSequenceOnly(b), b, steps)
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)


def test_kv_budget_gives_each_sequence_a_chunk_then_the_rest_to_global_layers(generator):
    cfg = generator.config  # 3 chunked (RoPE) layers, 1 global (NoPE) layer, chunk 8
    layout = plan_kv_layout(cfg, 1 << 20, 16, 4, torch.float32)
    assert layout.block_size == 8  # shrunk to divide the chunk
    assert layout.chunk_blocks == 4 * (8 // 8)
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert layout.full_bytes_per_token == per_token and layout.chunk_bytes_per_token == 3 * per_token
    assert layout.total_bytes <= 1 << 20
    assert layout.token_capacity == layout.full_blocks * 8
