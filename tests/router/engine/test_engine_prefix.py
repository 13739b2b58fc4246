"""Prefix caching in the engine: every request gets the tokens it gets with the cache off (greedy and seeded), whether
it shares 0, 1 or many full blocks with an earlier one, is wholly a prefix of one, continues one (a next turn),
or runs beside it; prompts run over several local-attention chunks (chunk 8, blocks of 4); under chunked prefill,
preemption and eviction pressure; `cached_tokens` says what was reused; a storm of aborts leaves no block held."""

from __future__ import annotations

import random

import pytest
import torch

from router.engine.config import EngineConfig
from router.engine.engine import Engine
from router.engine.scheduler import Scheduler
from router.engine.sequence import Sequence
from router.reference.decode import Generator
from router.request.block_hash import BlockHashes
from router.request.messages import Delta, EngineRequest, Final
from router.request.sampling_params import SamplingParams
from tests.conftest import make_hf_model
from tests.router.engine.test_block_cache import manager

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def seeded(seed: int) -> SamplingParams:
    return SamplingParams(temperature=0.9, top_p=0.9, seed=seed, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefix-ckpt")
    make_hf_model(seed=5, num_experts_per_tok=2, interleave_moe_layer_step=1).save_pretrained(path)  # chunk 8
    return Generator.from_checkpoint(path)


def engine_for(generator, caching: bool, **overrides) -> Engine:
    cfg = dict(max_num_seqs=8, max_num_batched_tokens=24, block_size=4, kv_cache_memory=1 << 20)
    config = EngineConfig(**{**cfg, **overrides, "prefix_caching": caching})
    return Engine(generator.runner, None, generator.eos_ids, {}, config)


BASE = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(7)).tolist()  # 10 blocks, 5 chunks


def family() -> dict[str, list[int]]:
    """Prompts against BASE: what each shares with it."""
    return {
        "none": [BASE[0] + 1, *BASE[1:]],  # differs in the first token: no block in common
        "one": [*BASE[:4], *BASE[20:36]],  # one full block
        "many": [*BASE[:30], 5, 6, 7, 8, 9],  # 7 full blocks, ending inside chunk 3
        "prefix": BASE[:21],  # wholly a prefix of BASE
        "same": list(BASE),
        "longer": [*BASE, *BASE[:13]],  # BASE and more (its answer differs): shares BASE's 10 blocks
    }


def drive(engine: Engine, arrivals: dict[int, list[EngineRequest]], aborts=None) -> tuple[dict, dict[str, Final]]:
    tokens, finals, step = {}, {}, 0
    while step <= max(arrivals) or engine.has_work():
        for req in arrivals.get(step, []):
            engine.add(req)
            tokens[req.request_id] = []
        for rid in (aborts or {}).get(step, []):
            if (final := engine.abort(rid)) is not None:
                finals[rid] = final
        for item in engine.step():
            if isinstance(item, Delta):
                tokens[item.request_id] += item.token_ids
            else:
                finals[item.request_id] = item
        step += 1
    return tokens, finals


def requests(params_of) -> tuple[EngineRequest, list[EngineRequest]]:
    base = EngineRequest("base", params_of(0), prompt_ids=tuple(BASE))
    rest = [EngineRequest(n, params_of(i + 1), prompt_ids=tuple(p)) for i, (n, p) in enumerate(family().items())]
    return base, rest


@pytest.mark.parametrize("params_of", [lambda i: GREEDY, seeded], ids=["greedy", "seeded"])
def test_after_a_prompt_finished_each_sharer_gets_the_tokens_of_cache_off(generator, params_of):
    base, rest = requests(params_of)
    arrivals = {0: [base], 40: rest}  # base has finished by step 40: its blocks are cached, none held
    off, _ = drive(engine_for(generator, False), arrivals)
    engine = engine_for(generator, True)
    on, finals = drive(engine, arrivals)
    assert on == off
    cached = {name: f.cached_tokens for name, f in finals.items()}
    # blocks of 4, chunks of 8: a hit stops short of the last token, at a full block the chunk pool can serve
    assert cached == {"base": 0, "none": 0, "one": 4, "many": 28, "prefix": 20, "same": 36, "longer": 40}
    assert engine.blocks.blocks_used == 0 and engine.stats().cached_tokens == sum(cached.values())


def test_sharers_running_beside_the_first_get_its_tokens(generator):
    base, rest = requests(lambda i: GREEDY)
    arrivals = {0: [base], 3: rest[:3], 6: rest[3:]}  # base is still prefilling / decoding
    off, _ = drive(engine_for(generator, False), arrivals)
    engine = engine_for(generator, True)
    on, finals = drive(engine, arrivals)
    assert on == off and sum(f.cached_tokens for f in finals.values()) > 0
    assert engine.blocks.blocks_used == 0


def test_chunked_prefill_with_pieces_off_the_block_grid(generator):
    base, rest = requests(lambda i: GREEDY)
    arrivals = {0: [base], 2: rest}
    off, _ = drive(engine_for(generator, False, max_num_batched_tokens=9), arrivals)
    on, finals = drive(engine_for(generator, True, max_num_batched_tokens=9), arrivals)
    assert on == off and finals["same"].cached_tokens > 0


def test_preemption_and_eviction_under_a_small_kv_budget(generator):
    """30 full blocks (120 tokens) and 8 chunk blocks: requests are preempted, cached blocks evicted, and the
    preempted ones come back through the cache; nothing changes a token."""
    budget = 8 * 3 * 256 * 4 + 30 * 256 * 4  # see test_engine.py: 256 bytes per token per layer
    base, rest = requests(seeded)
    arrivals = {0: [base, *rest[:2]], 4: rest[2:]}
    off_engine = engine_for(generator, False, kv_cache_memory=budget, max_num_seqs=4)
    off, _ = drive(off_engine, arrivals)
    engine = engine_for(generator, True, kv_cache_memory=budget, max_num_seqs=4)
    on, _ = drive(engine, arrivals)
    assert on == off
    assert engine.scheduler.preemptions > 0 and engine.blocks.evictions > 0
    assert engine.blocks.blocks_used == 0


def test_salts_never_share_and_the_same_salt_does(generator):
    engine = engine_for(generator, True)
    salted = lambda name, salt: EngineRequest(name, GREEDY, prompt_ids=tuple(BASE), cache_salt=salt)  # noqa: E731
    later = [salted("b", "tenant-b"), salted("c", None), salted("a2", "tenant-a")]
    _, finals = drive(engine, {0: [salted("a", "tenant-a")], 40: later})
    assert [finals[n].cached_tokens for n in ("b", "c", "a2")] == [0, 0, 36]


def test_a_storm_of_aborts_leaves_no_block_held(generator):
    rng = random.Random(3)
    engine = engine_for(generator, True, kv_cache_memory=8 * 3 * 256 * 4 + 40 * 256 * 4)
    prompts = list(family().values())
    reqs = [EngineRequest(f"r{i}", GREEDY, prompt_ids=tuple(prompts[i % len(prompts)])) for i in range(24)]
    arrivals = {step: reqs[step * 3 : step * 3 + 3] for step in range(8)}
    aborts = {step: [f"r{rng.randrange(24)}" for _ in range(2)] for step in range(1, 14)}
    _, finals = drive(engine, arrivals, aborts)
    assert len(finals) == 24 and any(f.finish_reason == "abort" for f in finals.values())
    assert engine.blocks.blocks_used == 0 and not engine.blocks.seqs
    assert not any(engine.blocks.full.refs) and not any(engine.blocks.chunk.refs)
    assert engine.blocks.cached_blocks > 0  # what finished stays cached, held by nobody


def test_blocks_are_named_only_once_their_step_completed():
    blocks = manager()
    sched = Scheduler(blocks, 4, 16, 1000, 8)
    seq = Sequence("a", range(3, 15), GREEDY, seed=0, block_hashes=BlockHashes(4))
    sched.add(seq)
    plan = sched.schedule()  # computes positions 0..7 (up to the chunk boundary): blocks 0 and 1
    assert blocks.cached_blocks == 0  # a step that has not completed (or is being replayed) names nothing
    sched.update(plan, {})
    assert blocks.full.num_cached == 2
