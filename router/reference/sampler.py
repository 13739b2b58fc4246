"""The per-row sampler the engine used before the batched one (router/engine/sampler.py): kept as the reference for
its distribution test and as the baseline of `moecluster bench sampler`.

Per row: logit_bias, penalties (presence/frequency over generated tokens, repetition over prompt and generated tokens),
min_tokens suppression of stop tokens, then greedy or temperature -> top-k -> top-p -> min-p sampling.

The random draw for a request's token at output position i is a pure function of (seed, i): a generator seeded
with a hash of both, made for that one draw. So a seeded request gets the same tokens whatever else is in the
batch, and a request that resumes on another router after a failover (its prompt plus the tokens already
streamed) continues exactly as the undisturbed run would. A request without a seed gets a random one when it is
admitted. Logprobs are of the model's distribution (log-softmax of the raw logits), as vLLM reports them.

Legend: N rows, V vocab.
"""

from __future__ import annotations

import torch

from router.engine.noise import row_key
from router.engine.sequence import Sequence
from router.request.messages import TokenLogprob
from router.request.sampling_params import SamplingParams


def draw_generator(seed: int, position: int, device: torch.device) -> torch.Generator:
    """The generator for the draw at output `position`: seeded by (seed, position) alone."""
    gen = torch.Generator(device=device)
    gen.manual_seed(row_key(seed, position))
    return gen


def sample_batch(logits_NV: torch.Tensor, states: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    logits_NV = logits_NV.float()
    tokens: list[int | None] = [None] * len(states)
    plain = [i for i, st in enumerate(states) if _plain_greedy(st)]
    if plain:  # one argmax and one device->host copy for all of them, not one per row
        for i, token in zip(plain, torch.argmax(logits_NV[plain], dim=-1).tolist()):
            tokens[i] = token
    for i, st in enumerate(states):
        if tokens[i] is None:
            tokens[i] = sample_row(adjusted_logits(logits_NV[i], st), st)
    logprobs = [
        token_logprob(logits_NV[i], tokens[i], st.params.top_logprobs) if st.params.logprobs else None
        for i, st in enumerate(states)
    ]
    return tokens, logprobs


def _plain_greedy(state: Sequence) -> bool:
    """Greedy with nothing that changes the logits first: argmax of the raw row."""
    p = state.params
    return (
        p.greedy
        and not p.logit_bias
        and not p.needs_penalties
        and not (len(state.output_ids) < p.min_tokens and state.stop_ids)
    )


def adjusted_logits(logits_V: torch.Tensor, state: Sequence) -> torch.Tensor:
    p = state.params
    if p.logit_bias:
        logits_V = logits_V.clone()
        for token, bias in p.logit_bias:
            logits_V[token] += bias
    if p.needs_penalties:
        logits_V = logits_V.clone()
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(
                sorted(set(state.prompt_ids) | set(state.output_ids)), dtype=torch.int64, device=logits_V.device
            )
            vals = logits_V[seen]
            logits_V[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if state.output_ids and (p.presence_penalty or p.frequency_penalty):
            counts_V = torch.bincount(
                torch.tensor(state.output_ids, device=logits_V.device), minlength=logits_V.shape[0]
            )
            logits_V -= p.frequency_penalty * counts_V + p.presence_penalty * (counts_V > 0)
    if len(state.output_ids) < p.min_tokens and state.stop_ids:
        logits_V = logits_V.clone()
        logits_V[torch.tensor(sorted(state.stop_ids), device=logits_V.device)] = float("-inf")
    return logits_V


def sample_row(logits_V: torch.Tensor, state: Sequence) -> int:
    p = state.params
    if p.greedy:
        return int(torch.argmax(logits_V))
    probs_V = filtered_probs(logits_V / p.temperature, p)
    generator = draw_generator(state.seed, len(state.output_ids), probs_V.device)
    return int(torch.multinomial(probs_V, 1, generator=generator))


def filtered_probs(scaled_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Softmax after top-k, then top-p (smallest set whose mass reaches p), then min-p; renormalised."""
    if params.top_k and params.top_k < scaled_V.shape[-1]:
        kth = torch.topk(scaled_V, params.top_k).values[-1]
        scaled_V = scaled_V.masked_fill(scaled_V < kth, float("-inf"))
    probs_V = torch.softmax(scaled_V, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs_V, descending=True)
        drop_sorted = torch.cumsum(sorted_p, -1) - sorted_p >= params.top_p  # mass before this token already enough
        probs_V = probs_V.masked_fill(drop_sorted.scatter(0, order, drop_sorted), 0.0)
    if params.min_p > 0:
        probs_V = probs_V.masked_fill(probs_V < params.min_p * probs_V.max(), 0.0)
    return probs_V / probs_V.sum()


def token_logprob(logits_V: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    logprobs_V = torch.log_softmax(logits_V.float(), dim=-1)
    top = ()
    if top_n:
        values, ids = torch.topk(logprobs_V, top_n)
        top = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs_V[token]), top)
