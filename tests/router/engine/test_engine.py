"""The serving engine: any mix of concurrent requests gives each request exactly the tokens it gets alone,
every KV block comes back, RoPE layers hold at most one chunk per sequence, bad requests fail alone."""

from __future__ import annotations

import pytest
import torch

from router.engine.config import EngineConfig
from router.engine.engine import Engine
from router.reference.decode import Generator
from router.request.errors import InvalidRequest
from router.request.messages import Delta, EngineRequest, Final
from router.request.sampling_params import SamplingParams
from tests.conftest import make_hf_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine-ckpt")
    make_hf_model(seed=5, num_experts_per_tok=2, interleave_moe_layer_step=1).save_pretrained(path)  # chunk 8
    return Generator.from_checkpoint(path)


def engine_for(generator, **overrides) -> Engine:
    cfg = dict(max_num_seqs=4, max_num_batched_tokens=24, block_size=4, kv_cache_memory=1 << 20)
    return Engine(generator.runner, None, generator.eos_ids, {}, EngineConfig(**{**cfg, **overrides}))


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in (3, 17, 9, 26, 1, 40, 12)]


def drive(
    engine: Engine,
    arrivals: dict[int, list[EngineRequest]],
    aborts: dict[int, list[str]] | None = None,
    on_step=lambda engine: None,
) -> tuple[dict[str, list[int]], dict[str, Final]]:
    tokens: dict[str, list[int]] = {}
    finals: dict[str, Final] = {}
    step = 0
    while step <= max(arrivals) or engine.has_work():
        for req in arrivals.get(step, []):
            engine.add(req)
            tokens[req.request_id] = []
        for rid in (aborts or {}).get(step, []):
            final = engine.abort(rid)
            if final:
                finals[rid] = final
        for item in engine.step():
            if isinstance(item, Delta):
                tokens.setdefault(item.request_id, []).extend(item.token_ids)
            else:
                finals[item.request_id] = item
        on_step(engine)
        step += 1
    return tokens, finals


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_batched_with_arrivals_aborts_and_preemption_equals_alone(generator, params):
    ps = prompts()
    alone = []
    for i, p in enumerate(ps):
        request_params = params if params.greedy else SamplingParams(**{**SEEDED.__dict__, "seed": 100 + i})
        alone.append(generator.generate(p, request_params.with_defaults({}).validate()).token_ids)
    requests = [
        EngineRequest(
            f"r{i}",
            params if params.greedy else SamplingParams(**{**SEEDED.__dict__, "seed": 100 + i}),
            prompt_ids=tuple(p),
        )
        for i, p in enumerate(ps)
    ]
    # per token per layer 2 (k, v) * 2 kv heads * 16 dims * 4 bytes = 256; blocks of 4 tokens. The chunk pool
    # (3 RoPE layers) takes 4 seqs * 2 blocks; the full pool (1 NoPE layer) gets 30 blocks = 120 tokens:
    # too few for four long sequences at once, so requests get preempted.
    engine = engine_for(generator, kv_cache_memory=8 * 3 * 256 * 4 + 30 * 256 * 4)
    assert engine.kv.full_blocks == 30 and engine.kv.chunk_blocks == 8
    arrivals = {0: requests[:3], 2: requests[3:5], 7: requests[5:]}
    tokens, finals = drive(engine, arrivals, aborts={5: ["r1"]})
    assert engine.scheduler.preemptions > 0
    assert finals["r1"].finish_reason == "abort"
    for i in range(len(ps)):
        if i != 1:
            assert finals[f"r{i}"].finish_reason == "length"
            assert tokens[f"r{i}"] == alone[i], f"request r{i}"
    assert engine.blocks.blocks_used == 0 and not engine.live


def test_every_block_returns_and_rope_layers_hold_one_chunk(generator):
    engine = engine_for(generator, max_num_batched_tokens=64)
    chunk_blocks = 8 // engine.kv.block_size
    worst = []

    def check(engine):
        worst.append(max((len(s.chunk) for s in engine.blocks.seqs.values()), default=0))

    reqs = [
        EngineRequest(
            f"long{i}",
            SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
            prompt_ids=tuple(range(3, 3 + 5 * i + 1)),
        )
        for i in range(4)
    ]
    drive(engine, {0: reqs}, on_step=check)
    assert max(worst) == chunk_blocks  # reached, never exceeded, over 60+ tokens = 8 chunks
    assert engine.blocks.blocks_used == 0


def test_bad_parameters_fail_only_that_request(generator):
    engine = engine_for(generator)
    good = EngineRequest("good", GREEDY, prompt_ids=(5, 6, 7))
    engine.add(good)
    cases = {
        "temperature": SamplingParams(temperature=-1.0),
        "top_p": SamplingParams(top_p=1.5),
        "top_k": SamplingParams(top_k=-1),
        "max_tokens": SamplingParams(max_tokens=0),
        "min_p": SamplingParams(min_p=2.0),
        "top_logprobs": SamplingParams(top_logprobs=99),
        "stop_token_ids": SamplingParams(stop_token_ids=(10**6,)),
    }
    for field, params in cases.items():
        with pytest.raises(InvalidRequest, match=field):
            engine.add(EngineRequest(f"bad-{field}", params, prompt_ids=(5, 6)))
    with pytest.raises(InvalidRequest, match=r"input_ids.*outside the vocabulary"):
        engine.add(EngineRequest("bad-ids", GREEDY, prompt_ids=(5, 999)))
    with pytest.raises(InvalidRequest, match="context length"):
        engine.add(EngineRequest("too-long", GREEDY, prompt_ids=tuple([5] * 5000)))
    with pytest.raises(InvalidRequest, match="exactly one of"):
        engine.add(EngineRequest("none", GREEDY))
    with pytest.raises(InvalidRequest, match="already in flight"):
        engine.add(good)
    tokens, finals = drive(engine, {0: []})
    assert finals["good"].finish_reason == "length" and len(tokens.get("good", [])) in (0, 24)
    assert set(finals) == {"good"}


def test_stop_token_ids_and_min_tokens(generator):
    engine = engine_for(generator)
    free = generator.generate([5, 6, 7], GREEDY.with_defaults({}).validate()).token_ids
    stop_at = free[5]
    first = free.index(stop_at)
    req = EngineRequest(
        "s",
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=(stop_at,)),
        prompt_ids=(5, 6, 7),
    )
    tokens, finals = drive(engine, {0: [req]})
    assert finals["s"].finish_reason == "stop" and finals["s"].matched_stop == stop_at
    assert tokens["s"] == free[: first + 1]


def test_logprobs_report_the_sampled_token_and_sorted_alternatives(generator):
    engine = engine_for(generator)
    req = EngineRequest(
        "lp", SamplingParams(temperature=0.0, max_tokens=3, logprobs=True, top_logprobs=5), prompt_ids=(5, 6, 7)
    )
    engine.add(req)
    deltas = []
    while engine.has_work():
        deltas += [d for d in engine.step() if isinstance(d, Delta)]
    for d in deltas:
        (lp,) = d.logprobs
        assert lp.token_id == d.token_ids[0] and len(lp.top) == 5
        assert lp.top[0][0] == lp.token_id and lp.logprob == pytest.approx(lp.top[0][1])  # greedy = best
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


@pytest.mark.parametrize("micro_batches", [2, 3])
def test_micro_batches_give_the_tokens_of_one_batch(generator, micro_batches):
    """Ping-pong micro-batches (mixed prefill and decode pieces, arrivals mid-run) change no token."""
    ps = prompts()

    def tokens(**config) -> dict[str, list[int]]:
        requests = [EngineRequest(f"r{i}", GREEDY, prompt_ids=tuple(p)) for i, p in enumerate(ps)]
        return drive(engine_for(generator, **config), {0: requests[:4], 3: requests[4:]})[0]

    assert tokens(micro_batches=micro_batches) == tokens(micro_batches=1)
