"""The expert exchange protocol over torch.distributed: both halves in one class, so they cannot drift.

Per step, router 0 broadcasts a header (run or stop) on the control group. Then, per MoE layer, in
layer order, every rank takes part in three `all_to_all_single` calls on the data group:
  1. counts   [W, Emax] int64: rows each rank sends to each rank, per local expert of the receiver
  2. tokens   gated rows, sorted by destination rank then local expert (routers send, workers receive)
  3. reply    expert outputs, the same rows in the same order (workers send, routers receive)
The router posts all three asynchronously, computes the shared expert meanwhile, and un-permutes on combine.
Workers learn their row counts from (1), so no per-row expert ids travel.

Legend: R rows, D hidden, E experts of a layer, W world size, Emax most experts any worker holds in a layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cluster.experts import ExpertShard
from cluster.placement import ExpertPlacement
from cluster.process_group import Groups, RankLayout

RUN, STOP = 1, 2


@dataclass
class _Pending:
    order_R: torch.Tensor
    y_sorted_RD: torch.Tensor
    works: list


class AllToAllTransport:
    def __init__(
        self,
        layout: RankLayout,
        groups: Groups,
        placement: ExpertPlacement,
        hidden: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.layout, self.groups, self.placement = layout, groups, placement
        self.hidden, self.device, self.dtype = hidden, device, dtype
        self.world = layout.world_size
        self.layers = sorted(placement.owners)
        self.emax = {layer: placement.max_local_experts(layer) for layer in self.layers}
        self._tables = {layer: placement.routing_tables(layer, device) for layer in self.layers}
        self._header = torch.zeros(2, dtype=torch.int64)  # [command, step], CPU: the control group is gloo
        self.steps = 0

    # ---- router half -------------------------------------------------------------------------------------
    def send_header(self, command: int) -> None:
        self._header[0], self._header[1] = command, self.steps
        dist.broadcast(self._header, src=0, group=self.groups.control)
        self.steps += command == RUN

    def dispatch(self, layer: int, x_RD: torch.Tensor, expert_R: torch.Tensor) -> _Pending:
        owner_E, local_E = self._tables[layer]
        emax = self.emax[layer]
        dest_R = owner_E[expert_R] + self.layout.num_routers
        key_R = dest_R * emax + local_E[expert_R]
        order_R = torch.argsort(key_R, stable=True)
        counts = torch.bincount(key_R, minlength=self.world * emax)
        send_split = counts.view(self.world, emax).sum(1).tolist()
        nothing = [0] * self.world
        x_sorted_RD = x_RD[order_R].contiguous()
        y_sorted_RD = torch.empty_like(x_sorted_RD)
        works = [
            dist.all_to_all_single(torch.empty_like(counts), counts, group=self.groups.data, async_op=True),
            dist.all_to_all_single(
                self._rows(0), x_sorted_RD, nothing, send_split, group=self.groups.data, async_op=True
            ),
            dist.all_to_all_single(
                y_sorted_RD, self._rows(0), send_split, nothing, group=self.groups.data, async_op=True
            ),
        ]
        return _Pending(order_R, y_sorted_RD, works)

    def combine(self, pending: _Pending) -> torch.Tensor:
        for work in pending.works:
            work.wait()
        y_RD = torch.empty_like(pending.y_sorted_RD)
        y_RD[pending.order_R] = pending.y_sorted_RD
        return y_RD

    # ---- worker half -------------------------------------------------------------------------------------
    def receive_header(self) -> int:
        dist.broadcast(self._header, src=0, group=self.groups.control)
        return int(self._header[0])

    def serve_step(self, shards: dict[int, ExpertShard], on_counts: Callable[[int, torch.Tensor], None]) -> None:
        """Follow one forward pass: for every MoE layer, receive rows, run the local experts, reply."""
        for layer in self.layers:
            self.serve_layer(layer, shards[layer], on_counts)

    def serve_layer(self, layer: int, shard: ExpertShard, on_counts) -> None:
        emax = self.emax[layer]
        counts_WE = torch.empty(self.world * emax, dtype=torch.int64, device=self.device)
        dist.all_to_all_single(counts_WE, torch.zeros_like(counts_WE), group=self.groups.data)
        counts_WE = counts_WE.view(self.world, emax)
        recv_split = counts_WE.sum(1).tolist()
        nothing = [0] * self.world
        x_RD = self._rows(sum(recv_split))
        dist.all_to_all_single(x_RD, self._rows(0), recv_split, nothing, group=self.groups.data)
        per_expert_E = counts_WE.sum(0)
        on_counts(layer, per_expert_E)
        if sum(1 for n in recv_split if n) <= 1:  # one sender: rows already grouped by local expert
            y_RD = shard.forward_sorted(x_RD, per_expert_E.tolist())
        else:
            local_R = torch.arange(emax, device=self.device).repeat(self.world).repeat_interleave(counts_WE.flatten())
            y_RD = shard.forward(x_RD, local_R)
        dist.all_to_all_single(self._rows(0), y_RD, nothing, recv_split, group=self.groups.data)

    def _rows(self, n: int) -> torch.Tensor:
        return torch.empty(n, self.hidden, device=self.device, dtype=self.dtype)
