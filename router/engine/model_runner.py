"""Runs one forward pass of the router's model, whatever reaches the experts: the in-process experts
(`LocalTransport`), or the router's channel to its expert workers, which replays the pass after a failover.

A replayed pass recomputes everything from the router's own state: KV writes land in the same slots with the same
values, and the routed-token counters are restored first so a replay does not count twice.

Micro-batches (ping-pong, cluster/model.py) pay only when the experts are remote and the router and the workers
compute on hardware of their own: then the router's attention for one micro-batch overlaps the workers' experts
for another. `micro_batches=None` picks: 2 for a step of at least AUTO_MIN_SEQS sequences with remote experts and a
CUDA router, else 1. On CPU the router and the workers share the host's cores, and two micro-batches measured 5-10%
slower at 32 streams on 2 cores (`moecluster bench engine --micro-batches auto,1,2` measures it on any host;
`scheduler.micro_batches: 2` forces it).
Before each remote pass the runner tells the transport its plan (exchanges per MoE layer, the largest exchange),
which picks the fixed-capacity path for decode-sized steps.
"""

from __future__ import annotations

import threading
import time

import torch

from cluster.batch import ForwardBatch, KVCache
from cluster.micro_batch import split_batch
from cluster.model import Llama4ForCausalLM
from cluster.transport import ExpertTransport
from router.experts.channel import ExpertChannel

AUTO_MIN_SEQS = 8  # with remote experts, steps of at least this many sequences run as two micro-batches


class ModelRunner:
    def __init__(self, model: Llama4ForCausalLM, experts: ExpertTransport | ExpertChannel | None):
        self.model, self.experts = model, experts
        self.lock = threading.Lock()  # one step at a time: collectives must be issued in order
        self.steps = 0
        self.forward_s = 0.0  # wall time in forward passes (with the transport's waited_s: measured overlap)
        self._counters = [m.feed_forward.tokens_per_expert for m in model.model.layers if m.is_moe]

    @property
    def remote(self) -> bool:
        return isinstance(self.experts, ExpertChannel)

    def micro_batches_for(self, batch: ForwardBatch, wanted: int | None) -> int:
        """`wanted`, or the automatic choice (module docstring); never more than the batch has sequences."""
        if wanted is None:
            overlap = self.remote and self.model.device.type == "cuda"
            wanted = 2 if overlap and len(batch.seqs) >= AUTO_MIN_SEQS else 1
        return min(wanted, len(batch.seqs))

    @torch.inference_mode()
    def forward(
        self,
        ids_T: torch.Tensor,
        batch: ForwardBatch,
        cache: KVCache,
        all_logits: bool = False,
        micro_batches: int | None = 1,
        embeds_TD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`embeds_TD`: the step's input embeddings when some rows take image features (else the model embeds)."""
        with self.lock:
            started = time.perf_counter()
            parts = self.micro_batches_for(batch, micro_batches)
            if not self.remote:
                logits = self.model(ids_T, batch, cache, self.experts, all_logits, parts, embeds_TD)
            else:
                logits = self.experts.run(self._remote_pass(ids_T, batch, cache, all_logits, parts, embeds_TD))
            self.steps += 1
            self.forward_s += time.perf_counter() - started
            return logits

    def _remote_pass(self, ids_T, batch: ForwardBatch, cache: KVCache, all_logits: bool, parts: int, embeds_TD):
        before = [c.clone() for c in self._counters]
        largest = max(p.batch.num_tokens for p in split_batch(batch, parts)) * self.model.config.num_experts_per_tok

        def attempt(transport):
            for counter, value in zip(self._counters, before):
                counter.copy_(value)
            transport.plan_step(parts, largest)
            return self.model(ids_T, batch, cache, transport, all_logits, parts, embeds_TD)

        return attempt

    @torch.inference_mode()
    def embed(self, ids_T: torch.Tensor) -> torch.Tensor:
        """The token embeddings [T, D] of `ids_T` (the router holds the embedding table)."""
        return self.model.model.embed_tokens(ids_T)

    @torch.inference_mode()
    def maintain(self) -> None:
        """Between steps: let the channel admit replacements and switch maps (nothing to do in-process)."""
        if self.remote:
            with self.lock:
                self.experts.maintain()
