"""The sampler: the batched greedy fast path equals row-by-row argmax; penalties, min_tokens, top-k/top-p/min-p
filtering and seeded draws behave as documented."""

from __future__ import annotations

import torch

from router.engine.sampler import adjusted_logits, filtered_probs, sample_batch
from router.engine.sequence import Sequence
from router.request.sampling_params import SamplingParams, resolve_seed


def state(params: SamplingParams, prompt=(1, 2), output=(), stop=frozenset()) -> Sequence:
    params = params.with_defaults({}).validate()
    return Sequence("r", prompt, params, seed=resolve_seed(params), stop_ids=frozenset(stop), output_ids=output)


def test_batched_greedy_equals_row_by_row_argmax_mixed_with_other_rows():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
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
    assert tokens[1] == int(torch.argmax(adjusted_logits(logits[1], states[1])))


def test_min_tokens_suppresses_stop_tokens_until_reached():
    logits = torch.zeros(10)
    logits[7] = 5.0
    st = state(SamplingParams(temperature=0.0, min_tokens=2), output=(3,), stop={7})
    assert sample_batch(logits[None], [st])[0] == [int(torch.argmax(adjusted_logits(logits, st)))]
    assert sample_batch(logits[None], [st])[0] != [7]
    st.append(4)
    assert sample_batch(logits[None], [st])[0] == [7]


def test_penalties_follow_their_definitions():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    st = state(
        SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        prompt=(0,),
        output=(1, 2, 2),
    )
    out = adjusted_logits(logits, st)
    assert out.tolist() == [1.0, -4.0 - 0.5 - 0.25, 0.5 - 0.5 - 0.5, 0.5]


def test_top_k_top_p_min_p_keep_the_documented_sets():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert (filtered_probs(probs, SamplingParams(top_p=1.0, top_k=2)) > 0).tolist() == [True, True, False, False]
    assert (filtered_probs(probs, SamplingParams(top_p=0.8, top_k=0)) > 0).tolist() == [True, True, False, False]
    assert (filtered_probs(probs, SamplingParams(top_p=1.0, top_k=0, min_p=0.25)) > 0).tolist() == [
        True,
        True,
        True,
        False,
    ]


def test_a_seeded_request_draws_the_same_tokens_whatever_else_is_in_the_batch():
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(3, 40, generator=g) for _ in range(5)]
    seeded = SamplingParams(temperature=1.0, seed=11)
    alone_state, batch_state = state(seeded), state(seeded)
    alone, together = [], []
    for step in rows:
        alone.append(sample_batch(step[:1], [alone_state])[0][0])
        others = [state(SamplingParams(temperature=1.0, seed=99)), state(SamplingParams(temperature=0.0))]
        together.append(sample_batch(step, [batch_state, *others])[0][0])
    assert alone == together


def test_a_seeded_draw_depends_only_on_the_seed_and_the_output_position():
    logits = torch.randn(80, generator=torch.Generator().manual_seed(5))
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
    assert other.output_ids != drawn


def test_a_request_without_a_seed_gets_one_that_stays_with_it():
    params = SamplingParams(temperature=1.0)
    assert resolve_seed(params) != resolve_seed(params)
    assert resolve_seed(SamplingParams(temperature=1.0, seed=4)) == 4
