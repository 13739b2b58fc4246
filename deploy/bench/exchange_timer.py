"""Times one MoE exchange (dispatch + combine) per layer, for benchmarks: the same random rows through
whatever transport the router has, so the all-to-all paths and the in-process path are measured alike; and the
router's own account of a serving run (time in forward passes, time blocked waiting for the workers).

Legend: T tokens, k experts per token, R = T*k rows, D hidden.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from cluster.all_to_all import RUN
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
    """The router actor plus benchmark calls, so the benchmarks time the real exchange (workers included) and
    read the router's overlap figures without a benchmark method in the serving actor."""

    def time_exchange(self, tokens: int, iters: int, path: str | None = None) -> dict[int, float]:
        """Median ms per MoE layer of dispatch + combine through this router's transport; `path` "fixed" or
        "split" forces an exchange path (None: as serving would choose)."""
        cfg = self.config
        with self.runner.lock:
            if self.channel is None:
                transport, before_step = self.runner.experts, lambda: None
            else:
                self.channel.maintain()
                transport = self.channel.transport

                def before_step():
                    transport.send_header(RUN)
                    transport.plan_step(1, tokens * cfg.num_experts_per_tok, path)

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
                before_step,
            )

    def exchange_stats(self) -> dict:
        """Forward passes so far, seconds in them, seconds of those blocked in combine waiting for the workers
        (the current epoch's transport), and the torch threads this actor computes with."""
        transport = self.channel.transport if self.channel else None
        return {
            "steps": self.runner.steps,
            "forward_s": self.runner.forward_s,
            "waited_s": transport.waited_s if transport is not None else 0.0,
            "threads": torch.get_num_threads(),
        }
