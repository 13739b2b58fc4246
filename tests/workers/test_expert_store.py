"""The expert store of one worker: the shards it holds per map generation, what a new generation reads from the
checkpoint (only the experts it does not hold), what it shares, retiring old generations, and the routed-token
counts per expert. The oracle is the checkpoint itself, read whole."""

from __future__ import annotations

import threading

import pytest
import torch

from cluster.checkpoint import CheckpointReader
from cluster.config import load_model_config
from cluster.expert_map import ExpertMap
from cluster.weights import load_expert_shard
from tests.conftest import make_hf_model
from workers.expert_store import ExpertStore

NUM_EXPERTS = 8
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    make_hf_model(seed=3, num_local_experts=NUM_EXPERTS).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cfg(model_dir):
    return load_model_config(model_dir)


@pytest.fixture(scope="module")
def full(model_dir, cfg):
    """layer -> every expert of the layer, read in one piece."""
    reader = CheckpointReader(model_dir)
    return {
        layer: load_expert_shard(cfg, reader, layer, range(NUM_EXPERTS), CPU, torch.float32) for layer in cfg.moe_layers
    }


def make_store(model_dir, cfg, slot):
    reader = CheckpointReader(model_dir)
    return ExpertStore(cfg, reader, slot, CPU, torch.float32), reader


def assert_holds(store, generation, full, expected):
    """The shards of `generation` hold exactly `expected` (layer -> experts), in that order, with the
    checkpoint's weights."""
    _, shards = store.generation(generation)
    assert {layer: shard.experts for layer, shard in shards.items()} == expected
    for layer, shard in shards.items():
        rows = list(shard.experts)
        torch.testing.assert_close(shard.gate_up_EDI2, full[layer].gate_up_EDI2[rows], rtol=0, atol=0)
        torch.testing.assert_close(shard.down_EID, full[layer].down_EID[rows], rtol=0, atol=0)


def test_a_slot_holds_its_experts_of_every_moe_layer(model_dir, cfg, full):
    m = ExpertMap.even(NUM_EXPERTS, cfg.moe_layers, num_workers=2)
    store, reader = make_store(model_dir, cfg, slot=1)
    store.load(m)
    assert_holds(store, 0, full, {layer: (4, 5, 6, 7) for layer in cfg.moe_layers})
    per_expert = sum(t.nbytes for t in (full[cfg.moe_layers[0]].gate_up_EDI2[0], full[cfg.moe_layers[0]].down_EID[0]))
    assert reader.bytes_read == 4 * per_expert * len(cfg.moe_layers)  # its half of the checkpoint's experts, no more
    assert store.bytes_resident == reader.bytes_read
    assert store.holdings() == {layer: [4, 5, 6, 7] for layer in cfg.moe_layers}


def test_a_new_generation_reads_only_the_experts_the_worker_does_not_hold(model_dir, cfg, full):
    m0 = ExpertMap.even(NUM_EXPERTS, cfg.moe_layers, num_workers=2)
    store, reader = make_store(model_dir, cfg, slot=0)
    store.load(m0)
    per_expert = store.bytes_resident // (4 * len(cfg.moe_layers))
    before = reader.bytes_read
    # slot 0 gains expert 6 (its new shard stacks held experts and the one read); slot 1 keeps what it had
    m1 = m0.successor({layer: [[0, 1, 2, 3, 6], [4, 5, 6, 7]] for layer in cfg.moe_layers})
    store.load(m1)
    assert reader.bytes_read - before == per_expert * len(cfg.moe_layers)  # expert 6 of each layer, only
    assert_holds(store, 1, full, {layer: (0, 1, 2, 3, 6) for layer in cfg.moe_layers})
    assert_holds(store, 0, full, {layer: (0, 1, 2, 3) for layer in cfg.moe_layers})  # still served meanwhile
    assert store.latest == 1


def test_an_unchanged_slot_shares_its_tensors_across_generations(model_dir, cfg):
    m0 = ExpertMap.even(NUM_EXPERTS, cfg.moe_layers, num_workers=2)
    store, reader = make_store(model_dir, cfg, slot=1)
    store.load(m0)
    resident, before = store.bytes_resident, reader.bytes_read
    store.load(m0.successor({layer: [[0, 1, 2, 3, 4], [4, 5, 6, 7]] for layer in cfg.moe_layers}))
    assert reader.bytes_read == before  # nothing read
    assert store.bytes_resident == resident  # nothing copied
    (_, old), (_, new) = store.generation(0), store.generation(1)
    assert all(old[layer].gate_up_EDI2 is new[layer].gate_up_EDI2 for layer in cfg.moe_layers)


def test_retire_frees_older_generations_and_a_step_of_one_names_what_is_held(model_dir, cfg):
    m0 = ExpertMap.even(NUM_EXPERTS, cfg.moe_layers, num_workers=2)
    store, _ = make_store(model_dir, cfg, slot=0)
    store.load(m0)
    resident = store.bytes_resident
    store.load(m0.successor({layer: [[4, 5, 6, 7], [0, 1, 2, 3]] for layer in cfg.moe_layers}))  # a full swap
    assert store.bytes_resident == 2 * resident  # both held until every router has switched
    store.retire(keep=1)
    assert store.bytes_resident == resident
    with pytest.raises(RuntimeError, match=r"generation 0 arrived, but this worker holds generations \[1\]"):
        store.generation(0)
    store.generation(1)


def test_token_counts_are_per_global_expert_across_generations(model_dir, cfg):
    m0 = ExpertMap.even(NUM_EXPERTS, cfg.moe_layers, num_workers=2)
    store, _ = make_store(model_dir, cfg, slot=0)
    store.load(m0)
    layer = cfg.moe_layers[0]
    store.count(0, layer, torch.tensor([5, 0, 2, 1]))  # local order 0, 1, 2, 3
    store.load(m0.successor({lay: [[3, 0, 6], [1, 2, 4, 5, 6, 7]] for lay in cfg.moe_layers}))
    store.count(1, layer, torch.tensor([10, 20, 30, 0, 0]))  # local 0 = expert 0, 1 = expert 3, 2 = expert 6
    counts = store.token_counts()
    assert counts[layer] == {0: 15, 3: 21, 6: 30}  # the newest generation's experts, counted across both
    assert all(set(c.values()) == {0} for lay, c in counts.items() if lay != layer)


def test_loading_a_generation_while_another_is_being_served(model_dir, cfg, full):
    """A rebalance loads on the worker's control thread while its step loop keeps reading generation 0."""
    m0 = ExpertMap.even(NUM_EXPERTS, cfg.moe_layers, num_workers=2)
    store, _ = make_store(model_dir, cfg, slot=0)
    store.load(m0)
    stop, seen, errors = threading.Event(), [], []

    def serve():
        while not stop.is_set():
            try:
                _, shards = store.generation(0)
                seen.append(shards[cfg.moe_layers[0]].experts)
            except Exception as e:  # noqa: BLE001 - collected for the assertion below
                errors.append(e)
                return

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        for g in range(1, 4):
            held = [[0, 1, 2, 3, 4 + g], [4, 5, 6, 7]]
            store.load(store.maps[store.latest].successor({lay: held for lay in cfg.moe_layers}))
    finally:
        stop.set()
        thread.join(10)
    assert errors == [] and seen and set(seen) == {(0, 1, 2, 3)}
    assert_holds(store, 3, full, {layer: (0, 1, 2, 3, 7) for layer in cfg.moe_layers})


def test_a_new_fp8_generation_reuses_held_experts_and_keeps_their_layout_and_scales(model_dir, cfg):
    reader = CheckpointReader(model_dir)
    store = ExpertStore(cfg, reader, 0, CPU, torch.float32, expert_dtype="fp8")
    first = ExpertMap.from_spec("0-3;4-7", NUM_EXPERTS, cfg.moe_layers)
    store.load(first)
    second = first.successor({layer: [[2, 5, 0], [1, 3, 4, 6, 7]] for layer in cfg.moe_layers})
    store.load(second)
    fresh = {
        layer: load_expert_shard(cfg, CheckpointReader(model_dir), layer, (0, 2, 5), CPU, torch.float32, "fp8")
        for layer in cfg.moe_layers
    }
    _, shards = store.generation(second.generation)
    for layer, shard in shards.items():
        assert shard.experts == (0, 2, 5) and shard.is_fp8 and store.weight_dtype == "fp8"
        assert shard.gate_up_EDI2.stride() == fresh[layer].gate_up_EDI2.stride()  # column-major, as read
        for a, b in zip(shard.pick(slice(None)), fresh[layer].pick(slice(None))):
            assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
