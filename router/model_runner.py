"""Runs one forward pass of the router's model, whatever reaches the experts: the in-process experts
(`LocalTransport`), or the router's channel to its expert workers, which replays the pass after a failover.

A replayed pass recomputes everything from the router's own state: KV writes land in the same slots with the same
values, and the routed-token counters are restored first so a replay does not count twice.
"""

from __future__ import annotations

import threading

import torch

from cluster.batch import ForwardBatch, KVCache
from cluster.model import Llama4ForCausalLM
from cluster.transport import ExpertTransport
from router.expert_channel import ExpertChannel


class ModelRunner:
    def __init__(self, model: Llama4ForCausalLM, experts: ExpertTransport | ExpertChannel | None):
        self.model, self.experts = model, experts
        self.lock = threading.Lock()  # one step at a time: collectives must be issued in order
        self.steps = 0
        self._counters = [m.feed_forward.tokens_per_expert for m in model.model.layers if m.is_moe]

    @property
    def remote(self) -> bool:
        return isinstance(self.experts, ExpertChannel)

    @torch.inference_mode()
    def forward(
        self,
        ids_T: torch.Tensor,
        batch: ForwardBatch,
        cache: KVCache,
        all_logits: bool = False,
        embeds_TD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`embeds_TD`: the step's input embeddings when some rows take image features (else the model embeds)."""
        with self.lock:
            if not self.remote:
                logits = self.model(ids_T, batch, cache, self.experts, all_logits=all_logits, embeds_TD=embeds_TD)
            else:
                before = [c.clone() for c in self._counters]

                def attempt(transport):
                    for counter, value in zip(self._counters, before):
                        counter.copy_(value)
                    return self.model(ids_T, batch, cache, transport, all_logits=all_logits, embeds_TD=embeds_TD)

                logits = self.experts.run(attempt)
            self.steps += 1
            return logits

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
