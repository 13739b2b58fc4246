"""Turns logits into tokens: greedy, or temperature with top-k, top-p and min-p, each request drawing from its
own generator so its samples do not depend on what else is in the batch.

Legend: V vocab.
"""

from __future__ import annotations

import torch

from router.sampling_params import SamplingParams


def request_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return gen


def sample(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.greedy:
        return int(torch.argmax(logits_V))
    probs_V = filtered_probs(logits_V.float() / params.temperature, params)
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
