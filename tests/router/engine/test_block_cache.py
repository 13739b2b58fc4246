"""Prefix caching in the block bookkeeping (no torch): chained hashes with images and salts, reference counts,
LRU eviction of unused cached blocks, and the chunk-pool rule (a hit needs the chunk blocks of its last chunk)."""

from __future__ import annotations

from router.engine.block_manager import KVBlockManager
from router.engine.block_pool import BlockPool
from router.request.block_hash import BlockHashes, ImageSpan, image_spans, prompt_block_hashes

BS = 4  # tokens per block; chunks of 8 = 2 blocks


def manager(full=32, chunk=16, chunk_size=8, uses_full=True, uses_chunk=True):
    return KVBlockManager(BS, full, chunk, chunk_size, uses_full, uses_chunk, caching=True)


def hashes(ids, salt=None, images=()):
    return prompt_block_hashes(ids, BS, salt, images)


def run(m, seq_id, ids, salt=None):
    """A sequence computes all of `ids` (one step), commits, and finishes; the tokens its admission reused."""
    h = hashes(ids, salt)
    hit = m.reuse(seq_id, h[: (len(ids) - 1) // BS])
    assert m.allocate(seq_id, hit, len(ids) - hit)
    m.commit(seq_id, h)
    m.free(seq_id)
    return hit


def compute(m, seq_id, h, lo, n):
    """A step of `seq_id` computes positions [lo, lo + n): allocate, commit the full blocks, release old chunks."""
    assert m.allocate(seq_id, lo, n)
    m.commit(seq_id, h[: (lo + n) // BS])
    m.release_finished_chunks(seq_id, lo + n)


def test_hashes_chain_so_a_block_names_its_whole_prefix():
    a, b = hashes(list(range(12))), hashes([99, *list(range(1, 12))])
    assert len(a) == 3 and a[0] != b[0] and a[1] != b[1]  # the same tokens after a different first block
    assert hashes(list(range(12))) == a and hashes(list(range(14))) == a  # a partial block is not named


def test_salt_and_images_change_the_hashes_of_the_blocks_they_touch():
    ids = list(range(12))
    assert not set(hashes(ids, "tenant-a")) & set(hashes(ids, "tenant-b"))
    cat, dog = (ImageSpan(5, 7, bytes([n]) * 32) for n in (1, 2))
    with_cat, with_dog = hashes(ids, images=[cat]), hashes(ids, images=[dog])
    assert with_cat[0] == with_dog[0] == hashes(ids)[0]  # block 0 holds no patch token
    assert with_cat[1] != with_dog[1] and with_cat[2] != with_dog[2]  # block 1 and everything after it differ
    assert hashes(ids, images=[cat]) == with_cat


def test_image_spans_split_the_patch_positions_by_image():
    ids = [5, 9, 9, 5, 9, 9, 9, 5]
    assert image_spans(ids, 9, [2, 3], [b"a", b"b"]) == (ImageSpan(1, 3, b"a"), ImageSpan(4, 7, b"b"))


def test_block_hashes_extend_as_tokens_arrive():
    ids = list(range(10))
    h = BlockHashes(BS)
    assert h.extend(ids.__getitem__, 7) == hashes(ids[:4]) and len(h.extend(ids.__getitem__, 10)) == 2


def test_pool_evicts_unused_cached_blocks_least_recently_used_first_and_never_held_ones():
    pool = BlockPool(3)
    a, b, c = pool.take(3)
    for block, key in ((a, b"A"), (b, b"B"), (c, b"C")):
        pool.register(block, key)
    pool.give_back([b])
    pool.give_back([a])  # a was released last: b goes first
    assert pool.num_free == 2
    assert pool.take(1) == [b] and pool.lookup(b"B") is None and pool.evictions == 1
    assert pool.lookup(b"A") == a and pool.lookup(b"C") == c  # c is held: never evicted


def test_pool_hit_takes_an_unused_block_out_of_the_lru():
    pool = BlockPool(2)
    (a,) = pool.take(1)
    pool.register(a, b"A")
    pool.give_back([a])
    pool.acquire(pool.lookup(b"A"))
    assert pool.num_free == 1 and pool.take(1) != [a]


def test_a_block_computed_twice_keeps_the_first_name():
    pool = BlockPool(2)
    a, b = pool.take(2)
    pool.register(a, b"X")
    pool.register(b, b"X")
    pool.give_back([a, b])
    assert pool.lookup(b"X") == a and pool.num_cached == 1 and pool.num_free == 2


def test_shared_prefix_is_reused_up_to_the_last_full_block_before_the_last_token():
    m = manager()
    assert run(m, "a", list(range(20))) == 0
    assert run(m, "b", list(range(20))) == 16  # the same prompt: all but the block holding its last token
    assert run(m, "c", list(range(13)) + [77] * 7) == 12  # shares 3 full blocks
    assert run(m, "d", [77, *list(range(1, 20))]) == 0  # differs in the first token
    assert m.blocks_used == 0 and m.seqs == {}


def test_a_prompt_wholly_a_prefix_of_another_reuses_all_of_its_full_blocks():
    m = manager()
    run(m, "long", list(range(24)))
    assert run(m, "short", list(range(13))) == 12


def test_hit_needs_the_chunk_blocks_of_the_chunk_it_ends_in():
    m = manager()
    ids = list(range(24))  # chunks [0, 8), [8, 16), [16, 24)
    h = hashes(ids)
    assert m.reuse("a", []) == 0 and m.allocate("a", 0, 24)
    m.commit("a", h)
    m.release_finished_chunks("a", 20)  # chunks 0 and 1 given back (cached, unused): chunk 2 still held
    held_chunk = dict(m.seqs["a"].chunk)
    m.free("a")
    # Evict every unused chunk-pool block except chunk 2's: the full pool still names all 6 blocks.
    m.chunk.take(m.chunk.num_free - len(held_chunk))
    assert m.reuse("b", h[:5]) == 20  # ends in chunk 2, whose blocks 4 and 5 are cached: block 4 is needed
    assert set(m.seqs["b"].chunk) == {4} and len(m.seqs["b"].full) == 5


def test_hit_falls_back_to_the_chunk_start_when_its_last_chunk_was_evicted():
    m = manager(chunk=4)
    ids = list(range(20))
    h = hashes(ids)
    for lo, n in ((0, 8), (8, 8), (16, 4)):
        compute(m, "a", h, lo, n)
    m.free("a")
    m.chunk.take(3)  # evicts the unused chunk blocks least recently used first: all but block 4's
    assert m.reuse("b", h[:4]) == 16 and m.seqs["b"].chunk == {}  # a chunk boundary: no chunk KV needed
    m.free("b")
    assert m.reuse("c", h[:5]) == 20 and set(m.seqs["c"].chunk) == {4}
    m.free("c")
    m.chunk.take(1)  # block 4's goes too
    assert m.reuse("d", h[:5]) == 16 and m.seqs["d"].chunk == {}  # falls back to the start of chunk 2


def test_full_blocks_in_use_are_shared_and_survive_eviction_pressure():
    m = manager(full=8)
    ids = list(range(16))
    h = hashes(ids)
    m.reuse("a", [])
    assert m.allocate("a", 0, 16)
    m.commit("a", h)
    assert m.reuse("b", h[:3]) == 12 and m.full.refs[m.seqs["a"].full[0]] == 2
    assert not m.allocate("c", 0, 40)  # 10 blocks: only 4 free, and held blocks are never evicted
    m.free("a")
    m.free("b")
    assert m.blocks_used == 0 and m.cached_blocks == 8  # 4 full + 4 chunk (chunk blocks 0..3 never released)


def test_caching_off_reuses_nothing_and_names_nothing():
    m = KVBlockManager(BS, 32, 16, 8, True, True, caching=False)
    ids = list(range(16))
    for name in "ab":
        assert m.reuse(name, hashes(ids)[:3]) == 0
        assert m.allocate(name, 0, 16)
        m.commit(name, hashes(ids))
        m.free(name)
    assert m.cached_blocks == 0


def test_a_model_without_chunked_layers_uses_the_full_pool_only():
    m = manager(chunk=0, chunk_size=None, uses_chunk=False)
    run(m, "a", list(range(20)))
    assert run(m, "b", list(range(20))) == 16


def test_a_model_without_global_layers_hits_only_on_chunk_blocks_it_holds():
    m = manager(full=0, uses_full=False)
    run(m, "a", list(range(6)))  # one block, in chunk 0
    assert run(m, "b", list(range(6))) == 4
    assert run(m, "c", list(range(20))) == 0  # ends in chunk 2, whose blocks were never computed
