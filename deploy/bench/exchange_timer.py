"""Times one MoE exchange (dispatch + combine) per layer, for benchmarks: the same random rows through
whatever transport the router has, so the all-to-all path and the in-process path are measured alike.

Legend: T tokens, k experts per token, R = T*k rows, D hidden.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from cluster.all_to_all import RUN, AllToAllTransport
from cluster.transport import ExpertTransport
from router.router_actor import RouterActor


def time_exchange(
    transport: ExpertTransport,
    layers: list[int],
    tokens: int,
    top_k: int,
    num_experts: int,
    hidden: int,
    device: torch.device,
    dtype: torch.dtype,
    iters: int,
    before_step: Callable[[], None] = lambda: None,
) -> dict[int, float]:
    """Median milliseconds per layer of `combine(dispatch(rows))`, after one warm-up step."""
    g = torch.Generator().manual_seed(tokens)
    x_RD = torch.randn(tokens * top_k, hidden, generator=g).to(device, dtype)
    # distinct experts per token, as top-k gives
    expert_R = torch.argsort(torch.rand(tokens, num_experts, generator=g), dim=1)[:, :top_k].reshape(-1).to(device)
    samples: dict[int, list[float]] = {layer: [] for layer in layers}
    for it in range(iters + 1):
        before_step()
        for layer in layers:
            _sync(device)
            start = time.perf_counter()
            transport.combine(transport.dispatch(layer, x_RD, expert_R))
            _sync(device)
            if it:  # the first step warms up
                samples[layer].append((time.perf_counter() - start) * 1e3)
    return {layer: sorted(s)[len(s) // 2] for layer, s in samples.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ExchangeBenchRouter(RouterActor):
    """The router actor plus one benchmark call, so `bench transport` times the real exchange (workers included)
    without a benchmark method in the serving actor."""

    def time_exchange(self, tokens: int, iters: int) -> dict[int, float]:
        """Median ms per MoE layer of dispatch + combine through this router's transport."""
        transport, cfg = self.runner.transport, self.config
        remote = isinstance(transport, AllToAllTransport)
        with self.runner.lock:
            self.runner.check()
            return time_exchange(
                transport,
                list(cfg.moe_layers),
                tokens,
                cfg.num_experts_per_tok,
                cfg.num_local_experts,
                cfg.hidden_size,
                self.device,
                self.dtype,
                iters,
                before_step=(lambda: transport.send_header(RUN)) if remote else (lambda: None),
            )
