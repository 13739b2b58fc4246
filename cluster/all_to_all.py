"""The expert exchange protocol over one channel's process groups: both halves in one class, so they cannot drift.

Per step the router broadcasts a header [command, step, map generation] on the control group: RUN (a forward
pass follows), REGROUP (leave this epoch's group: the membership is changing) or STOP. Then, per MoE layer, in
layer order, every rank takes part in three `all_to_all_single` calls on the data group:
  1. counts  [W, Emax] int64: rows each rank sends to each rank, per local expert of the receiver
  2. rows    gated rows, sorted by destination rank then local expert (the router sends, workers receive)
  3. reply   expert outputs, the same rows in the same order (workers send, the router receives)
The router posts all three asynchronously, computes the shared expert meanwhile, and un-permutes on combine.
Workers learn their row counts from (1), so no per-row expert ids travel.

Replicas: when an expert has copies on several live members, all of a step's rows for it go to one copy, chosen
by rotating with the step number. Keeping an expert's rows together keeps each expert matmul the same size as
with one copy, so results do not depend on which copy served them (the float result of a row does depend on the
number of rows in the matmul on the backends we measured; docs/design.md).

A failed collective (a peer died or its group was closed) raises `CollectiveError`, which callers recover from;
any other exception is a bug and propagates.

Legend: R rows, D hidden, E experts of a layer, W world size of the channel, Emax most experts one slot holds.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cluster.expert_map import ExpertMap
from cluster.experts import ExpertShard
from cluster.process_group import CONTROL_TIMEOUT_S, ChannelGroups

RUN, STOP, REGROUP = 1, 2, 3
MAX_ROTATIONS = 64  # precomputed replica rotations per layer (the lcm of copy counts, capped)


class CollectiveError(RuntimeError):
    """A collective of the channel failed: a peer died, its sockets closed, or the group timed out or was aborted."""


@dataclass
class _Pending:
    order_R: torch.Tensor
    y_sorted_RD: torch.Tensor
    works: list


class RouteTables:
    """Router side: for each MoE layer and replica rotation, the destination rank and local index of every
    expert, given the map and the live members (slot -> rank). Built on each membership or map change."""

    def __init__(self, expert_map: ExpertMap, members: Sequence[int], device: torch.device):
        rank_of = {slot: i + 1 for i, slot in enumerate(members)}
        self.emax = {layer: expert_map.max_local_experts(layer) for layer in expert_map.layers}
        self.tables: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for layer in expert_map.layers:
            live = [[w for w in expert_map.copies(layer, e) if w in rank_of] for e in range(expert_map.num_experts)]
            assert all(live), f"layer {layer}: an expert has no live copy among members {list(members)}"
            rotations = min(math.lcm(*(len(c) for c in live)), MAX_ROTATIONS)
            self.tables[layer] = []
            for r in range(rotations):
                chosen = [c[(r + e) % len(c)] for e, c in enumerate(live)]
                dest = [rank_of[w] for w in chosen]
                local = [expert_map.experts_of(w, layer).index(e) for e, w in enumerate(chosen)]
                self.tables[layer].append((torch.tensor(dest, device=device), torch.tensor(local, device=device)))

    def for_step(self, layer: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self.tables[layer]
        return tables[step % len(tables)]


class AllToAllTransport:
    def __init__(self, groups: ChannelGroups, hidden: int, device: torch.device, dtype: torch.dtype):
        self.groups, self.hidden, self.device, self.dtype = groups, hidden, device, dtype
        self.world = groups.world_size
        with torch.inference_mode(False):  # written in place both inside and outside inference mode
            self._header = torch.zeros(3, dtype=torch.int64)  # [command, step, generation], CPU: control is gloo
        self.routes: RouteTables | None = None
        self._header_opts = dist.BroadcastOptions()  # idle members wait for the next header as long as it takes
        self._header_opts.rootRank, self._header_opts.timeout = 0, datetime.timedelta(seconds=CONTROL_TIMEOUT_S)
        self._a2a_opts = dist.AllToAllOptions()  # a stuck exchange fails after the collective timeout
        self._a2a_opts.timeout = datetime.timedelta(seconds=groups.address.timeout_s)
        self.generation = 0
        self.steps = 0

    # ---- router half -------------------------------------------------------------------------------------
    def set_routes(self, expert_map: ExpertMap, members: Sequence[int]) -> None:
        """Address rows by this map over these members (slots in rank order); takes effect at the next step."""
        self.routes, self.generation = RouteTables(expert_map, members, self.device), expert_map.generation

    def send_header(self, command: int) -> None:
        self._header[0], self._header[1], self._header[2] = command, self.steps, self.generation
        _wait(self.groups.control.broadcast([self._header], self._header_opts))
        self.steps += command == RUN

    def dispatch(self, layer: int, x_RD: torch.Tensor, expert_R: torch.Tensor) -> _Pending:
        dest_E, local_E = self.routes.for_step(layer, self.steps - 1)
        emax = self.routes.emax[layer]
        key_R = dest_E[expert_R] * emax + local_E[expert_R]
        order_R = torch.argsort(key_R, stable=True)
        counts = torch.bincount(key_R, minlength=self.world * emax)
        send_split = counts.view(self.world, emax).sum(1).tolist()
        nothing = [0] * self.world
        x_sorted_RD = x_RD[order_R].contiguous()
        y_sorted_RD = torch.empty_like(x_sorted_RD)
        data = self.groups.data
        works = [
            _post(lambda: data.alltoall_base(torch.empty_like(counts), counts, [], [], self._a2a_opts)),
            _post(lambda: data.alltoall_base(self._rows(0), x_sorted_RD, nothing, send_split, self._a2a_opts)),
            _post(lambda: data.alltoall_base(y_sorted_RD, self._rows(0), send_split, nothing, self._a2a_opts)),
        ]
        return _Pending(order_R, y_sorted_RD, works)

    def combine(self, pending: _Pending) -> torch.Tensor:
        for work in pending.works:
            _wait(work)
        y_RD = torch.empty_like(pending.y_sorted_RD)
        y_RD[pending.order_R] = pending.y_sorted_RD
        return y_RD

    # ---- worker half -------------------------------------------------------------------------------------
    def receive_header(self) -> tuple[int, int, int]:
        """(command, step, map generation) of the router's next step."""
        _wait(self.groups.control.broadcast([self._header], self._header_opts))
        command, step, generation = (int(v) for v in self._header)
        return command, step, generation

    def serve_step(
        self, expert_map: ExpertMap, shards: dict[int, ExpertShard], on_counts: Callable[[int, torch.Tensor], None]
    ) -> None:
        """Follow one forward pass: for every MoE layer, receive rows, run the local experts, reply."""
        for layer in expert_map.layers:
            self.serve_layer(layer, expert_map.max_local_experts(layer), shards[layer], on_counts)

    def serve_layer(self, layer: int, emax: int, shard: ExpertShard, on_counts) -> None:
        data = self.groups.data
        counts_WE = torch.empty(self.world * emax, dtype=torch.int64, device=self.device)
        _wait(_post(lambda: data.alltoall_base(counts_WE, torch.zeros_like(counts_WE), [], [], self._a2a_opts)))
        counts_WE = counts_WE.view(self.world, emax)
        recv_split = counts_WE.sum(1).tolist()
        nothing = [0] * self.world
        x_RD = self._rows(sum(recv_split))
        _wait(_post(lambda: data.alltoall_base(x_RD, self._rows(0), recv_split, nothing, self._a2a_opts)))
        per_expert_E = counts_WE.sum(0)
        on_counts(layer, per_expert_E)
        if sum(1 for n in recv_split if n) <= 1:  # one sender: rows already grouped by local expert
            y_RD = shard.forward_sorted(x_RD, per_expert_E.tolist())
        else:
            local_R = torch.arange(emax, device=self.device).repeat(self.world).repeat_interleave(counts_WE.flatten())
            y_RD = shard.forward(x_RD, local_R)
        _wait(_post(lambda: data.alltoall_base(self._rows(0), y_RD, nothing, recv_split, self._a2a_opts)))

    def _rows(self, n: int) -> torch.Tensor:
        return torch.empty(n, self.hidden, device=self.device, dtype=self.dtype)


def _post(start: Callable[[], object]):
    """Start a collective; a broken group raises at once, as CollectiveError."""
    try:
        return start()
    except RuntimeError as e:
        raise CollectiveError(_first_line(e)) from e


def _wait(work) -> None:
    try:
        work.wait()
    except RuntimeError as e:
        raise CollectiveError(_first_line(e)) from e


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
