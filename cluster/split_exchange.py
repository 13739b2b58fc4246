"""The variable-split exchange: exact-size messages, sized by a counts round first. Both halves in one class.

Per exchange, every rank of the channel takes part in three `all_to_all_single` calls on the data group:
  1. counts  [W, Emax] int64: rows the router sends to each rank, per local expert of the receiver
  2. rows    gated rows, sorted by destination rank then local expert (the router sends, workers receive)
  3. reply   expert outputs, the same rows in the same order (workers send, the router receives)
Workers learn their row counts from (1) (`.tolist()`: a host sync), so no per-row expert ids travel and no byte is
padding. It wins for large steps (prefill), where padding to a capacity would cost more than a round trip;
cluster/fixed_exchange.py is the decode path.

Legend: R rows, D hidden, W world size of the channel, Emax most experts one slot holds.
"""

from __future__ import annotations

import torch

from cluster.collective import Pending, post, wait
from cluster.experts import ExpertShard


class SplitExchange:
    def __init__(self, data, world: int, hidden: int, device: torch.device, dtype: torch.dtype, options):
        self.data, self.world, self.hidden, self.device, self.dtype = data, world, hidden, device, dtype
        self.options = options  # AllToAllOptions: the collective timeout

    # ---- router half -------------------------------------------------------------------------------------
    def dispatch(self, dest_E, local_E, emax: int, x_RD: torch.Tensor, expert_R: torch.Tensor, blocks=None):
        key_R = dest_E[expert_R] * emax + local_E[expert_R]
        order_R = torch.argsort(key_R, stable=True)
        counts = torch.bincount(key_R, minlength=self.world * emax)
        send_split = counts.view(self.world, emax).sum(1).tolist()
        nothing = [0] * self.world
        x_sorted_RD = x_RD[order_R].contiguous()
        y_sorted_RD = torch.empty_like(x_sorted_RD)
        data, opts = self.data, self.options
        works = [
            post(lambda: data.alltoall_base(torch.empty_like(counts), counts, [], [], opts)),
            post(lambda: data.alltoall_base(self._rows(0), x_sorted_RD, nothing, send_split, opts)),
            post(lambda: data.alltoall_base(y_sorted_RD, self._rows(0), send_split, nothing, opts)),
        ]
        return Pending(works, lambda: _unsort(y_sorted_RD, order_R))

    # ---- worker half -------------------------------------------------------------------------------------
    def serve(self, layer: int, emax: int, shard: ExpertShard, on_counts, blocks=None) -> None:
        data, opts = self.data, self.options
        counts_WE = torch.empty(self.world * emax, dtype=torch.int64, device=self.device)
        wait(post(lambda: data.alltoall_base(counts_WE, torch.zeros_like(counts_WE), [], [], opts)))
        counts_WE = counts_WE.view(self.world, emax)
        recv_split = counts_WE.sum(1).tolist()
        nothing = [0] * self.world
        x_RD = self._rows(sum(recv_split))
        wait(post(lambda: data.alltoall_base(x_RD, self._rows(0), recv_split, nothing, opts)))
        per_expert_E = counts_WE.sum(0)
        on_counts(layer, per_expert_E)
        if sum(1 for n in recv_split if n) <= 1:  # one sender: rows already grouped by local expert
            y_RD = shard.forward_sorted(x_RD, per_expert_E.tolist())
        else:
            local_R = torch.arange(emax, device=self.device).repeat(self.world).repeat_interleave(counts_WE.flatten())
            y_RD = shard.forward(x_RD, local_R)
        wait(post(lambda: data.alltoall_base(self._rows(0), y_RD, nothing, recv_split, opts)))

    def _rows(self, n: int) -> torch.Tensor:
        return torch.empty(n, self.hidden, device=self.device, dtype=self.dtype)


def _unsort(y_sorted_RD: torch.Tensor, order_R: torch.Tensor) -> torch.Tensor:
    y_RD = torch.empty_like(y_sorted_RD)
    y_RD[order_R] = y_sorted_RD
    return y_RD
