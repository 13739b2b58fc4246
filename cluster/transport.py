"""How the MoE layers reach their experts. The router calls `dispatch` with gated rows and their global expert
ids, computes the shared expert meanwhile, then calls `combine` to get each row's expert output back in the
order it was sent.

`LocalTransport` runs the experts in the calling process (one GPU, tests, `--workers 0`). The distributed
transport (all_to_all over torch.distributed) has the same two verbs, so the model never knows which it has.

Legend: R rows (token, expert choice pairs), D hidden.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from cluster.experts import ExpertShard


class ExpertTransport(Protocol):
    def dispatch(self, layer: int, x_RD: torch.Tensor, expert_R: torch.Tensor) -> Any:
        """Start sending rows to the owners of their experts; returns a handle for `combine`."""

    def combine(self, handle: Any) -> torch.Tensor:
        """Wait for the experts' outputs; [R, D] in the order the rows were dispatched."""


class LocalTransport:
    """All experts of every MoE layer in this process. `shards[layer]` holds experts 0..E-1 in order."""

    def __init__(self, shards: dict[int, ExpertShard]):
        for layer, shard in shards.items():
            assert shard.experts == tuple(range(len(shard.experts))), (
                f"layer {layer}: local shard must hold all experts"
            )
        self.shards = shards

    def dispatch(self, layer: int, x_RD: torch.Tensor, expert_R: torch.Tensor) -> torch.Tensor:
        return self.shards[layer].forward(x_RD, expert_R)

    def combine(self, handle: torch.Tensor) -> torch.Tensor:
        return handle
