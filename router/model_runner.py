"""Runs one forward pass of the router's model, whatever transport reaches the experts.

With remote experts, each forward starts with a RUN header so the workers follow the MoE layers; a failed
collective is turned into a `ClusterFailure` that names the worker (from the failure monitor) instead of a
bare socket error. After a failure the runner refuses further steps: the process group is broken.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from cluster.all_to_all import RUN, AllToAllTransport
from cluster.batch import ForwardBatch, KVCache
from cluster.model import Llama4ForCausalLM
from cluster.transport import ExpertTransport


class ClusterFailure(RuntimeError):
    """The expert side can no longer serve (a worker died or raised); the message names the worker."""


class ModelRunner:
    def __init__(
        self,
        model: Llama4ForCausalLM,
        transport: ExpertTransport,
        failure: Callable[[], str | None] = lambda: None,
        failure_wait_s: float = 10.0,
    ):
        self.model, self.transport = model, transport
        self.failure, self.failure_wait_s = failure, failure_wait_s
        self.lock = threading.Lock()  # one step at a time: collectives must be issued in order
        self.steps = 0

    @property
    def remote(self) -> bool:
        return isinstance(self.transport, AllToAllTransport)

    def check(self) -> None:
        reason = self.failure()
        if reason:
            raise ClusterFailure(reason)

    @torch.inference_mode()
    def forward(
        self, ids_T: torch.Tensor, batch: ForwardBatch, cache: KVCache, all_logits: bool = False
    ) -> torch.Tensor:
        with self.lock:
            self.check()
            try:
                if self.remote:
                    self.transport.send_header(RUN)
                logits = self.model(ids_T, batch, cache, self.transport, all_logits=all_logits)
            except Exception as e:  # a collective failed: find out who is gone, within a bound
                if not self.remote:
                    raise
                raise ClusterFailure(self._explain(e)) from e
            self.steps += 1
            return logits

    def _explain(self, error: Exception) -> str:
        deadline = time.monotonic() + self.failure_wait_s
        while time.monotonic() < deadline:
            reason = self.failure()
            if reason:
                return reason
            time.sleep(0.05)
        return f"expert exchange failed and no worker reported why within {self.failure_wait_s:.0f}s: {error}"
