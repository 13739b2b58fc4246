"""The batched sampler: greedy rows are exact argmax; penalties and min_tokens give the per-row reference's logits;
top-k/top-p/min-p keep the documented sets; draws follow the reference's distribution (chi-square); a seeded row's
tokens depend only on (seed, position), whatever else is in the batch; one host read per step."""

from __future__ import annotations

import math

import torch

from deploy.bench.host_reads import HostSyncs
from router.engine import sampler
from router.engine.noise import gumbel, row_key, unit
from router.engine.sampler import RowMasks, adjusted_logits, sample_batch
from router.engine.sequence import Sequence
from router.reference import sampler as reference
from router.request.sampling_params import SamplingParams, resolve_seed


def state(params: SamplingParams, prompt=(1, 2), output=(), stop=frozenset(), seed=None) -> Sequence:
    params = params.with_defaults({}).validate()
    seed = resolve_seed(params) if seed is None else seed
    return Sequence("r", prompt, params, seed=seed, stop_ids=frozenset(stop), output_ids=output)


def randn(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_batched_greedy_equals_row_by_row_argmax_mixed_with_other_rows():
    logits = randn(6, 50)
    greedy = SamplingParams(temperature=0.0)
    states = [
        state(greedy),
        state(SamplingParams(temperature=0.0, repetition_penalty=1.5)),
        state(greedy),
        state(SamplingParams(temperature=1.0, seed=3)),
        state(greedy),
        state(greedy),
    ]
    tokens, _ = sample_batch(logits, states)
    for i in (0, 2, 4, 5):
        assert tokens[i] == int(torch.argmax(logits[i]))
    assert tokens[1] == int(torch.argmax(reference.adjusted_logits(logits[1], states[1])))


def test_min_tokens_suppresses_stop_tokens_until_reached():
    logits = torch.zeros(10)
    logits[7] = 5.0
    st = state(SamplingParams(temperature=0.0, min_tokens=2), output=(3,), stop={7})
    assert sample_batch(logits[None], [st])[0] == [int(torch.argmax(reference.adjusted_logits(logits, st)))]
    assert sample_batch(logits[None], [st])[0] != [7]
    st.append(4)
    assert sample_batch(logits[None], [st])[0] == [7]


def test_penalties_follow_their_definitions_and_match_the_reference_row_by_row():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    st = state(
        SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        prompt=(0,),
        output=(1, 2, 2),
    )
    assert adjusted_logits(logits[None], [st])[0].tolist() == [1.0, -4.0 - 0.5 - 0.25, 0.5 - 0.5 - 0.5, 0.5]
    g = torch.Generator().manual_seed(2)
    states = [
        state(
            SamplingParams(temperature=1.0, repetition_penalty=r, presence_penalty=p, frequency_penalty=f),
            prompt=torch.randint(0, 60, (n,), generator=g).tolist(),
            output=torch.randint(0, 60, (m,), generator=g).tolist(),
            stop={5, 9},
        )
        for r, p, f, n, m in [(1.3, 0.0, 0.0, 5, 3), (1.0, 0.7, -0.4, 2, 9), (0.8, -1.0, 2.0, 9, 0), (1.0, 0, 0, 3, 1)]
    ]
    states[3] = state(SamplingParams(temperature=1.0, min_tokens=4), prompt=(3,), output=(1,), stop={5, 9})
    batch = randn(4, 60)
    out = adjusted_logits(batch, states)
    for i, st in enumerate(states):
        assert torch.allclose(out[i], reference.adjusted_logits(batch[i], st), atol=1e-6)


def drawn_set(logits_V: torch.Tensor, params: SamplingParams, draws: int = 300) -> set[int]:
    states = [state(params, seed=s) for s in range(draws)]
    return set(sample_batch(logits_V.expand(draws, -1), states)[0])


def test_top_k_top_p_min_p_keep_the_documented_sets():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert drawn_set(logits, SamplingParams(temperature=1.0, top_p=1.0, top_k=2)) == {0, 1}
    assert drawn_set(logits, SamplingParams(temperature=1.0, top_p=0.8, top_k=0)) == {0, 1}
    assert drawn_set(logits, SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.25)) == {0, 1, 2}
    assert drawn_set(logits, SamplingParams(temperature=1.0, top_p=1.0, top_k=0)) == {0, 1, 2, 3}


def chi_square_bound(df: int) -> float:
    """The chi-square statistic a correct sampler exceeds with probability 1e-4 (Wilson-Hilferty)."""
    z = 3.719
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_draws_follow_the_filtered_distribution_as_the_reference_does():
    """Chi-square of 20000 draws each, new and reference, against the reference's filtered probabilities."""
    logits = randn(40, seed=7) * 2
    for params in (
        SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.02),
        SamplingParams(temperature=1.3, top_p=1.0, top_k=0),
        SamplingParams(temperature=0.7, top_p=0.75, top_k=0),
    ):
        probs = reference.filtered_probs(logits / params.temperature, params)
        support = (probs > 0).nonzero()[:, 0].tolist()
        n = 20000
        batched = sample_batch(logits.expand(n, -1), [state(params, seed=s) for s in range(n)])[0]
        per_row = [reference.sample_row(logits, state(params, seed=s)) for s in range(n)]
        for draws in (batched, per_row):
            counts = torch.bincount(torch.tensor(draws), minlength=40).double()
            assert counts[[t for t in range(40) if t not in support]].sum() == 0, "a filtered-out token was drawn"
            expected = probs[support].double() * n
            stat = float(((counts[support] - expected) ** 2 / expected).sum())
            assert stat < chi_square_bound(len(support) - 1), (params, stat)


def test_a_seeded_request_draws_the_same_tokens_whatever_else_is_in_the_batch():
    g = torch.Generator().manual_seed(1)
    others = [
        SamplingParams(temperature=1.0, seed=99),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_p=0.5, presence_penalty=1.0),
        SamplingParams(temperature=1.2, min_p=0.1, logprobs=True, top_logprobs=3),
        SamplingParams(temperature=0.9, top_k=3, repetition_penalty=1.2),
    ]
    for seeded in (SamplingParams(temperature=1.0, seed=11), SamplingParams(temperature=0.8, top_p=0.9, seed=5)):
        alone_state, batch_state = state(seeded), state(seeded)
        for _ in range(8):
            step = torch.randn(1 + len(others) * 12, 300, generator=g)
            alone = sample_batch(step[:1], [alone_state])[0][0]
            crowd = [state(others[j % len(others)], output=(j,)) for j in range(len(others) * 12)]
            together = sample_batch(step, [batch_state, *crowd])[0][0]
            assert alone == together
            alone_state.append(alone)
            batch_state.append(together)


def test_a_seeded_draw_depends_only_on_the_seed_and_the_output_position():
    logits = randn(80, seed=5)
    params = SamplingParams(temperature=1.0, seed=11)
    straight = state(params)
    drawn = []
    for _ in range(12):  # one request drawing 12 tokens in a row
        token = sample_batch(logits[None], [straight])[0][0]
        straight.append(token)
        drawn.append(token)
    resumed = state(params, output=drawn[:7])  # the same request resumed elsewhere after 7 tokens
    rest = []
    for _ in range(5):
        token = sample_batch(logits[None], [resumed])[0][0]
        resumed.append(token)
        rest.append(token)
    assert rest == drawn[7:]
    other = state(SamplingParams(temperature=1.0, seed=12))  # another seed draws other tokens
    for _ in range(12):
        other.append(sample_batch(logits[None], [other])[0][0])
    assert list(other.output_ids) != drawn


def test_a_request_without_a_seed_gets_one_that_stays_with_it():
    params = SamplingParams(temperature=1.0)
    assert resolve_seed(params) != resolve_seed(params)
    assert resolve_seed(SamplingParams(temperature=1.0, seed=4)) == 4


def mixed_batch(vocab: int) -> tuple[torch.Tensor, list[Sequence], RowMasks]:
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, frequency_penalty=0.5, logprobs=True, top_logprobs=4),
        SamplingParams(temperature=0.8, top_p=0.9, seed=1, logprobs=True),
        SamplingParams(temperature=1.0, min_p=0.05, seed=2),
        SamplingParams(temperature=0.6, top_k=5, seed=3, min_tokens=3),
        SamplingParams(temperature=1.0, seed=4),
    ]
    states = [state(p, output=(1, 2), stop={0}) for p in params]
    bitmask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    bitmask[0, 0] = 0b1110  # tokens 1, 2, 3
    return randn(len(states), vocab, seed=3) * 4, states, RowMasks([5], bitmask)  # peaked, as a model's are


def test_one_host_read_per_step_whatever_the_mix_of_rows():
    logits, states, masks = mixed_batch(2000)
    with HostSyncs() as syncs:
        tokens, logprobs = sample_batch(logits, states, masks)
    assert syncs.calls == 1
    assert tokens[5] in (1, 2, 3)  # the constrained row
    assert tokens[0] == int(torch.argmax(logits[0]))
    assert [lp is not None for lp in logprobs] == [False, True, True, False, False, False]
    expected = reference.token_logprob(logits[1], tokens[1], 4)
    assert logprobs[1].token_id == tokens[1] and len(logprobs[1].top) == 4
    assert math.isclose(logprobs[1].logprob, expected.logprob, rel_tol=1e-5)
    assert [t for t, _ in logprobs[1].top] == [t for t, _ in expected.top]


def test_constraint_masks_touch_only_their_rows():
    logits, states, masks = mixed_batch(300)
    constrained = sample_batch(logits, states, masks)[0]
    free = sample_batch(logits, states)[0]
    assert constrained[:5] == free[:5]
    for seed in range(50):
        states[5].seed = seed
        assert sample_batch(logits, states, masks)[0][5] in (1, 2, 3)


def test_a_top_p_set_past_the_candidates_is_drawn_over_the_whole_vocabulary():
    flat = randn(3, 4096, seed=9) * 0.1  # top 16 tokens hold far less than top_p
    states = [state(SamplingParams(temperature=1.0, top_p=0.95, seed=s, logprobs=True)) for s in range(3)]
    with HostSyncs() as syncs:
        few = sample_batch(flat, states, candidates=16)
    assert syncs.calls == 2  # the step's read, then the redrawn rows'
    assert few == sample_batch(flat, states, candidates=4096)
    assert sampler.CANDIDATES < 4096


def test_the_noise_is_finite_for_every_hash_so_a_masked_token_is_never_drawn():
    extremes = torch.tensor([0, 1, 2**8 - 1, 2**9, 2**31, 2**32 - 2**9, 2**32 - 1], dtype=torch.int64)
    u = unit(extremes)
    assert bool(((u > 0) & (u < 1)).all())
    assert bool(torch.isfinite(-torch.log(-torch.log(u))).all())
    keys = torch.tensor([row_key(s, p) for s in range(64) for p in range(4)])
    noise = gumbel(keys, torch.arange(4096).expand(len(keys), -1))
    assert bool(torch.isfinite(noise).all())


def test_logit_bias_is_added_before_the_rest_and_matches_the_reference_row_by_row():
    logits = randn(4, 50, seed=4)
    best = int(torch.argmax(logits[0]))
    second = int(torch.topk(logits[0], 2).indices[1])
    forced = int(torch.argmin(logits[0]))
    states = [
        state(SamplingParams(temperature=0.0, logit_bias=((best, -100.0),))),  # banned: the next best wins
        state(SamplingParams(temperature=0.0, logit_bias=((forced, 100.0),))),  # the least likely is forced
        state(SamplingParams(temperature=0.0)),  # no bias: untouched by the others'
        state(SamplingParams(temperature=0.0, repetition_penalty=1.3, logit_bias=((3, 2.5), (9, -1.0))), output=(3,)),
    ]
    batch = torch.stack([logits[0], logits[0], logits[2], logits[3]])
    tokens, _ = sample_batch(batch, states)
    assert tokens[:3] == [second, forced, int(torch.argmax(logits[2]))]
    adjusted = adjusted_logits(batch, states)
    for i, st in enumerate(states):
        assert torch.equal(adjusted[i], reference.adjusted_logits(batch[i], st))


def test_a_banned_token_is_never_drawn_and_logprobs_stay_the_models():
    logits = torch.zeros(1, 20)
    logits[0, 5] = 8.0  # nearly all the mass
    for seed in range(200):
        st = state(SamplingParams(temperature=1.0, seed=seed, logit_bias=((5, -100.0),), logprobs=True))
        (token,), (lp,) = sample_batch(logits, [st])
        assert token != 5
        expected = reference.token_logprob(logits[0], token, 0)
        assert math.isclose(lp.logprob, expected.logprob, rel_tol=1e-6)  # of the raw logits, as vLLM reports
