"""Turns a batch of logits into tokens: every row that samples this step, all at once, on the logits' device.

In order, each filter over the whole batch (rows that do not use a filter skip it at no cost):
  logit_bias (added to the named tokens' logits, as OpenAI's);
  penalties (presence/frequency over generated tokens, repetition over prompt and generated tokens);
  min_tokens suppression of stop tokens; the token bitmasks of constrained rows (structured output);
  greedy rows: argmax; sampled rows: temperature, then top-k -> top-p -> min-p, then a Gumbel-max draw.

The draw of a request's token at output position i is a pure function of (seed, i, token id) (router/engine/noise.py),
so a seeded request gets the same tokens whatever else is in the batch, and a request that resumes on another router
after a failover continues exactly. A request without a seed gets a random one when it is admitted.

Top-k/top-p rows draw among their `CANDIDATES` best tokens (a partial sort, not a full one); the draw is exact when
those hold the row's top-p mass, which the step checks. A row whose top-p set reaches past them (a very flat
distribution) is drawn again over its whole vocabulary, after the step's one host read: then a second read, for
those rows only. Logprobs are of the model's distribution (log-softmax of the raw logits), as vLLM reports them.

One host read per step: the sampled ids, each row's "redraw" flag and the logprobs, packed in one tensor.

Legend: N rows, V vocab, R rows of one kind, K candidates per row, W bitmask words (32 tokens each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from router.engine.noise import gumbel, row_key
from router.request.messages import TokenLogprob
from router.request.sampling_params import SamplingParams

if TYPE_CHECKING:
    from router.engine.sequence import Sequence

CANDIDATES = 1024  # top-k/top-p rows draw among this many best tokens (more when a row's top_k asks for more)
FULL_ROW_CHUNK = 16  # rows of whole-vocabulary noise hashed at once (bounds the int64 temporaries)


@dataclass(frozen=True)
class RowMasks:
    """The allowed tokens of the constrained rows this step: row indices into the batch, and their bitmasks
    (xgrammar's layout: int32 [R, W], bit j of word w allows token 32 * w + j)."""

    rows: list[int]
    bitmask_RW: torch.Tensor


def sample_batch(
    logits_NV: torch.Tensor, states: list[Sequence], masks: RowMasks | None = None, candidates: int = CANDIDATES
) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row (and its logprob when the row asks): row i samples for `states[i]` (the sampler reads its
    params, prompt_ids, output_ids, stop_ids and seed)."""
    raw_NV = logits_NV.float()
    logits_NV = adjusted_logits(raw_NV, states, masks)
    n, vocab = logits_NV.shape
    dev = logits_NV.device
    tokens_N = torch.zeros(n, dtype=torch.int64, device=dev)
    redraw_N = torch.zeros(n, dtype=torch.bool, device=dev)
    greedy = [i for i, st in enumerate(states) if st.params.greedy]
    filtered = [i for i, st in enumerate(states) if not st.params.greedy and _filters(st.params)]
    plain = [i for i, st in enumerate(states) if not st.params.greedy and not _filters(st.params)]
    if greedy:
        tokens_N[greedy] = torch.argmax(logits_NV[greedy], dim=-1)
    if filtered:
        k = min(vocab, max(candidates, *(states[i].params.top_k for i in filtered)))
        tokens_N[filtered], redraw_N[filtered] = draw_candidates(logits_NV[filtered], _rows(states, filtered, dev), k)
    if plain:
        tokens_N[plain] = draw_full(logits_NV[plain], _rows(states, plain, dev))
    host = _read(raw_NV, tokens_N, redraw_N, states)  # the step's one host read
    tokens = [int(row[0]) for row in host]
    logprobs = [_logprob(row, st.params) if st.params.logprobs else None for row, st in zip(host, states)]
    redraw = [i for i, row in enumerate(host) if row[1]]
    if redraw:  # rare: a top-p set past the candidates; exact over the whole vocabulary
        tokens_R, _ = draw_candidates(logits_NV[redraw], _rows(states, redraw, dev), vocab)
        no_redraw_R = torch.zeros_like(tokens_R, dtype=torch.bool)
        part = _read(raw_NV[redraw], tokens_R, no_redraw_R, [states[i] for i in redraw])
        for i, row in zip(redraw, part):
            tokens[i] = int(row[0])
            logprobs[i] = _logprob(row, states[i].params) if states[i].params.logprobs else None
    return tokens, logprobs


def _filters(p: SamplingParams) -> bool:
    return bool(p.top_k) or p.top_p < 1.0


@dataclass(frozen=True)
class _Rows:
    """The sampling parameters of R rows as tensors on the logits' device."""

    temperature_R: torch.Tensor
    top_k_R: torch.Tensor
    top_p_R: torch.Tensor
    log_min_p_R: torch.Tensor  # -inf: off
    keys_R: torch.Tensor  # the draws' keys: (seed, output position) hashed


def _rows(states: list, rows: list[int], dev: torch.device) -> _Rows:
    ps = [states[i].params for i in rows]
    return _Rows(
        torch.tensor([p.temperature for p in ps], dtype=torch.float32, device=dev),
        torch.tensor([p.top_k or 0 for p in ps], dtype=torch.int64, device=dev),
        torch.tensor([p.top_p for p in ps], dtype=torch.float32, device=dev),
        torch.tensor([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in ps], device=dev),
        torch.tensor([row_key(states[i].seed, states[i].num_output_tokens) for i in rows], device=dev),
    )


def draw_candidates(logits_RV: torch.Tensor, rows: _Rows, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, top-p and min-p over each row's k best tokens, then a Gumbel-max draw among those kept. Returns the
    tokens [R] and whether a row's top-p set may reach past the k candidates (then it must be drawn with k = V)."""
    scaled_RV = logits_RV / rows.temperature_R[:, None]
    vals_RK, ids_RK = torch.topk(scaled_RV, k, dim=-1)  # sorted, best first
    has_k_R = rows.top_k_R > 0
    beyond_k_RK = has_k_R[:, None] & (torch.arange(k, device=vals_RK.device)[None] >= rows.top_k_R[:, None])
    vals_RK = vals_RK.masked_fill(beyond_k_RK, -math.inf)
    log_z_R = torch.where(has_k_R, torch.logsumexp(vals_RK, -1), torch.logsumexp(scaled_RV, -1))  # top-k renormalises
    logp_RK = vals_RK - log_z_R[:, None]
    probs_RK = logp_RK.exp()
    top_p_R = rows.top_p_R[:, None]
    drop_RK = beyond_k_RK | ((top_p_R < 1.0) & (probs_RK.cumsum(-1) - probs_RK >= top_p_R))  # mass before: enough
    drop_RK |= logp_RK < rows.log_min_p_R[:, None] + logp_RK[:, :1]  # min-p: relative to the most likely token
    score_RK = (logp_RK + gumbel(rows.keys_R, ids_RK)).masked_fill(drop_RK, -math.inf)
    tokens_R = ids_RK.gather(1, score_RK.argmax(-1, keepdim=True))[:, 0]
    complete_R = has_k_R | (probs_RK.sum(-1) >= rows.top_p_R) | (k == logits_RV.shape[-1])
    return tokens_R, ~complete_R


def draw_full(logits_RV: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """Temperature and min-p over the whole vocabulary, then a Gumbel-max draw; the noise is hashed a few rows at a
    time."""
    logp_RV = torch.log_softmax(logits_RV / rows.temperature_R[:, None], dim=-1)
    drop_RV = logp_RV < rows.log_min_p_R[:, None] + logp_RV.max(-1, keepdim=True).values
    logp_RV = logp_RV.masked_fill(drop_RV, -math.inf)
    ids_V = torch.arange(logp_RV.shape[-1], device=logp_RV.device)
    out = []
    for a in range(0, logp_RV.shape[0], FULL_ROW_CHUNK):
        keys = rows.keys_R[a : a + FULL_ROW_CHUNK]
        noise = gumbel(keys, ids_V.expand(keys.shape[0], -1))
        out.append((logp_RV[a : a + FULL_ROW_CHUNK] + noise).argmax(-1))
    return torch.cat(out)


def adjusted_logits(raw_NV: torch.Tensor, states: list, masks: RowMasks | None = None) -> torch.Tensor:
    """Logit bias, penalties, min_tokens suppression and constraint masks, batched; `raw_NV` itself when no row has
    any."""
    biased = [(i, t, b) for i, st in enumerate(states) for t, b in st.params.logit_bias]
    penalised = [i for i, st in enumerate(states) if st.params.needs_penalties]
    suppress = [
        (i, t) for i, st in enumerate(states) if st.num_output_tokens < st.params.min_tokens for t in st.stop_ids
    ]
    if not biased and not penalised and not suppress and not (masks and masks.rows):
        return raw_NV
    logits_NV = raw_NV.clone()
    if biased:  # one scatter for every row's biases
        rows, toks, values = zip(*biased)
        dev = logits_NV.device
        index = (torch.tensor(rows, device=dev), torch.tensor(toks, device=dev))
        logits_NV.index_put_(index, torch.tensor(values, dtype=logits_NV.dtype, device=dev), accumulate=True)
    if penalised:
        logits_NV[penalised] = _penalties(logits_NV[penalised], [states[i] for i in penalised])
    if suppress:
        rows, toks = zip(*suppress)
        logits_NV[list(rows), list(toks)] = -math.inf
    if masks and masks.rows:
        logits_NV[masks.rows] = apply_bitmask(logits_NV[masks.rows], masks.bitmask_RW.to(logits_NV.device))
    return logits_NV


def _penalties(logits_RV: torch.Tensor, states: list) -> torch.Tensor:
    """Repetition (CTRL: divide positive logits, multiply negative ones, of every token seen in prompt or output),
    then frequency * count + presence * (count > 0) over generated tokens."""
    dev, (r, v) = logits_RV.device, logits_RV.shape
    seen_rows, seen_toks, out_rows, out_toks = [], [], [], []
    for j, st in enumerate(states):
        output = st.output_ids  # a copy each time it is read: read once
        if st.params.repetition_penalty != 1.0:
            seen = set(st.prompt_ids) | set(output)
            seen_rows += [j] * len(seen)
            seen_toks += seen
        out_rows += [j] * len(output)
        out_toks += output
    param = lambda name: torch.tensor([getattr(st.params, name) for st in states], device=dev)[:, None]  # noqa: E731
    seen_RV = torch.zeros(r, v, dtype=torch.bool, device=dev)
    seen_RV[torch.tensor(seen_rows, dtype=torch.int64), torch.tensor(seen_toks, dtype=torch.int64)] = True
    rep = param("repetition_penalty")
    logits_RV = torch.where(seen_RV, torch.where(logits_RV > 0, logits_RV / rep, logits_RV * rep), logits_RV)
    counts_RV = torch.zeros(r, v, device=dev)
    idx = (torch.tensor(out_rows, dtype=torch.int64, device=dev), torch.tensor(out_toks, dtype=torch.int64, device=dev))
    counts_RV.index_put_(idx, torch.ones(len(out_toks), device=dev), accumulate=True)
    return logits_RV - (param("frequency_penalty") * counts_RV + param("presence_penalty") * (counts_RV > 0))


def apply_bitmask(logits_RV: torch.Tensor, bitmask_RW: torch.Tensor) -> torch.Tensor:
    """-inf wherever the row's bitmask has a 0 bit (xgrammar's layout)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask_RW.device)
    allowed = ((bitmask_RW.unsqueeze(-1) >> shifts) & 1).reshape(bitmask_RW.shape[0], -1)[:, : logits_RV.shape[-1]]
    return logits_RV.masked_fill(allowed == 0, -math.inf)


def _read(raw_NV: torch.Tensor, tokens_N: torch.Tensor, redraw_N: torch.Tensor, states: list) -> list[list[float]]:
    """One device->host read: per row [token, redraw, logprob, top ids..., top logprobs...] (exact in float64)."""
    wanted = [i for i, st in enumerate(states) if st.params.logprobs]
    top_n = max((states[i].params.top_logprobs for i in wanted), default=0)
    out_NC = torch.zeros(len(states), 3 + 2 * top_n, dtype=torch.float64, device=raw_NV.device)
    out_NC[:, 0], out_NC[:, 1] = tokens_N, redraw_N
    if wanted:
        logprobs_LV = torch.log_softmax(raw_NV[wanted], dim=-1)
        out_NC[wanted, 2] = logprobs_LV.gather(1, tokens_N[wanted][:, None])[:, 0].double()
        if top_n:
            values, ids = torch.topk(logprobs_LV, top_n)
            out_NC[wanted, 3 : 3 + top_n], out_NC[wanted, 3 + top_n :] = ids.double(), values.double()
    return out_NC.tolist()


def _logprob(row: list[float], params: SamplingParams) -> TokenLogprob:
    top_n = (len(row) - 3) // 2
    top = tuple((int(row[3 + j]), row[3 + top_n + j]) for j in range(params.top_logprobs))
    return TokenLogprob(int(row[0]), row[2], top)
