"""The expert exchange protocol over one channel's process groups: both halves in one class, so they cannot drift.

Per step the router sends each member a header on the control group:

    [command, step, map generation, exchanges per MoE layer, capacity]

`command` is RUN (a forward pass follows), REGROUP (leave this epoch's group: the membership is changing), STOP, or
FENCE (the step failed: a member died; `receive_header` raises CollectiveError, as a broken collective would).
After a RUN, every MoE layer in layer order makes `exchanges` exchanges (one per micro-batch of the step, in
micro-batch order), and each exchange takes the path the header names:
  capacity 0  the split path (cluster/split_exchange.py): three collectives with exact-size messages (counts,
              rows, reply); workers read the counts on the host. Large steps (prefill) take it.
  capacity C  the fixed path (cluster/fixed_exchange.py): two rounds of point-to-point messages between the
              router and each worker, rows padded to C with their counts in front, and the reply; no host sync on
              either side. Decode-sized steps take it.
The router decides per step (`plan_step`, before the step's first dispatch): the RUN header goes out with the
step's first exchange, once the plan is known. A step that was never planned makes one split exchange per layer.

Replicas: when an expert has copies on several live members, all of a step's rows for it go to one copy, chosen
by rotating with the step number. Keeping an expert's rows together keeps each expert matmul the same size as
with one copy, so results do not depend on which copy served them (the float result of a row does depend on the
number of rows in the matmul on the backends we measured; docs/design.md). Both paths keep it so.

A failed collective (a peer died or its group was closed) raises `CollectiveError`, which callers recover from;
any other exception is a bug and propagates.

Legend: R rows, D hidden, E experts of a layer, W world size of the channel, Emax most experts one slot holds.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from cluster.collective import SEND_WAIT, Pending, post, send_to_members, wait, wait_best_effort
from cluster.errors import CollectiveError
from cluster.expert_map import ExpertMap
from cluster.experts import ExpertShard
from cluster.fixed_exchange import FENCE_WAIT, Blocks, FixedExchange
from cluster.process_group import CONTROL_TIMEOUT_S, ChannelGroups
from cluster.split_exchange import SplitExchange

__all__ = ["REGROUP", "RUN", "STOP", "AllToAllTransport", "CollectiveError", "RouteTables", "fixed_capacity"]

RUN, STOP, REGROUP, FENCE = 1, 2, 3, 4
MAX_ROTATIONS = 64  # precomputed replica rotations per layer (the lcm of copy counts, capped)
FIXED_MAX_ROWS = 256  # steps whose exchanges carry at most this many rows take the fixed path (bench exchange)
CAPACITY_STEP = 8  # capacities are multiples of this: a few shapes recur, rather than one per batch size


def fixed_capacity(max_rows: int) -> int:
    """The fixed path's capacity for exchanges of at most `max_rows` rows; 0 (the split path) past FIXED_MAX_ROWS."""
    return _bucket(max_rows) if max_rows <= FIXED_MAX_ROWS else 0


def _bucket(rows: int) -> int:
    return max(1, -(-rows // CAPACITY_STEP)) * CAPACITY_STEP


class RouteTables:
    """Router side: for each MoE layer and replica rotation, the destination rank and local index of every
    expert, given the map and the live members (slot -> rank). Built on each membership or map change."""

    def __init__(self, expert_map: ExpertMap, members: Sequence[int], device: torch.device):
        rank_of = {slot: i + 1 for i, slot in enumerate(members)}
        self.num_experts = expert_map.num_experts
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
            self._header = torch.zeros(5, dtype=torch.int64)  # see the module docstring; CPU: control is gloo
        self.routes: RouteTables | None = None
        self._idle_wait = datetime.timedelta(seconds=CONTROL_TIMEOUT_S)  # members wait for the next header this long
        a2a_opts = dist.AllToAllOptions()  # a stuck exchange fails after the collective timeout
        a2a_opts.timeout = datetime.timedelta(seconds=groups.address.timeout_s)
        self.split = SplitExchange(groups.data, self.world, hidden, device, dtype, a2a_opts)
        # gloo: each point-to-point message is waited for within a bound (see cluster/collective.py). NCCL: a bounded
        # wait would block the host until the GPU finishes, so the data group's waits stay stream-ordered; its own
        # timeout and the router's monitor, which aborts the communicator when a member dies, bound them instead
        nccl = groups.address.backend == "nccl"
        self.fixed = FixedExchange(groups.data, self.world, hidden, device, dtype, None if nccl else a2a_opts.timeout)
        self._header_wait = min(SEND_WAIT, a2a_opts.timeout)  # the control group is gloo on every backend
        self._send_wait = None if nccl else self._header_wait
        self.generation = 0
        self.steps = 0
        self.plan = (1, 0)  # this step's (exchanges per MoE layer, capacity)
        self._blocks: Blocks | None = None  # the fixed path's message shape this step
        self._run_due = False  # a RUN header waits for the step's first exchange
        self._fenced = False  # this step's workers were told it failed
        self.waited_s = 0.0  # router: time blocked in combine, waiting for the workers (overlap measurements)

    # ---- router half -------------------------------------------------------------------------------------
    def set_routes(self, expert_map: ExpertMap, members: Sequence[int]) -> None:
        """Address rows by this map over these members (slots in rank order); takes effect at the next step."""
        self.routes, self.generation = RouteTables(expert_map, members, self.device), expert_map.generation

    def send_header(self, command: int) -> None:
        """STOP and REGROUP go out now; a RUN goes out with the step's first exchange, carrying its plan."""
        if command == RUN:
            self._run_due, self._fenced, self.plan = True, False, (1, 0)
            self.steps += 1
            return
        self._run_due = False
        self._send_headers(command, self.steps, (0, 0))

    def plan_step(self, exchanges_per_layer: int, max_rows: int, path: str | None = None) -> None:
        """Before the step's first dispatch: each MoE layer makes `exchanges_per_layer` exchanges of at most
        `max_rows` rows. `path` None: small exchanges take the fixed path, others the split one; "fixed" or
        "split" forces one (benchmarks)."""
        assert self._run_due, "plan_step belongs between send_header(RUN) and the step's first dispatch"
        assert path in (None, "fixed", "split"), path
        capacity = fixed_capacity(max_rows) if path is None else _bucket(max_rows) if path == "fixed" else 0
        self.plan = (exchanges_per_layer, capacity)
        self._blocks = self.fixed.blocks(self.routes.num_experts, capacity) if capacity else None

    def dispatch(self, layer: int, x_RD: torch.Tensor, expert_R: torch.Tensor) -> Pending:
        with self._fence_on_failure():
            if self._run_due:
                self._run_due = False
                self._send_headers(RUN, self.steps - 1, self.plan)
            dest_E, local_E = self.routes.for_step(layer, self.steps - 1)
            exchange = self.fixed if self._blocks else self.split
            return exchange.dispatch(dest_E, local_E, self.routes.emax[layer], x_RD, expert_R, self._blocks)

    def combine(self, pending: Pending) -> torch.Tensor:
        started = time.perf_counter()
        with self._fence_on_failure():
            for work in pending.sends:
                wait(work, self._send_wait)
            for work in pending.works:
                wait(work, pending.timeout)
        self.waited_s += time.perf_counter() - started
        return pending.finish()

    @contextmanager
    def _fence_on_failure(self) -> Iterator[None]:
        """A failed step: tell the workers, who may be waiting on the router alone, for rows of the fixed path
        (a fence block) or for the next header (FENCE), so that the survivors end this epoch at once."""
        try:
            yield
        except CollectiveError:
            if not self._fenced:
                self._fenced = True
                if self._blocks is not None:
                    self.fixed.fence(self._blocks)
                self._fence_headers()
            raise

    def _fence_headers(self) -> None:
        fence = torch.tensor([FENCE, self.steps - 1, self.generation, 0, 0])
        works, _ = send_to_members(self.groups.control, fence, self.world)  # a member gone already needs none
        wait_best_effort(works, FENCE_WAIT)

    def _send_headers(self, command: int, step: int, plan: tuple[int, int]) -> None:
        """The header to every member, each its own message rather than a broadcast: one that is dead does not
        keep it from the others (a gloo broadcast is a tree, and a dead inner node or a failed first send would),
        so every survivor of a failed step is where a fence reaches it."""
        self._header.copy_(torch.tensor([command, step, self.generation, *plan]))
        works, failure = send_to_members(self.groups.control, self._header, self.world)
        for work in works:
            try:
                wait(work, self._header_wait)
            except CollectiveError as e:
                failure = failure or e
        if failure is not None:
            raise failure

    # ---- worker half -------------------------------------------------------------------------------------
    def receive_header(self) -> tuple[int, int, int]:
        """(command, step, map generation) of the router's next step; its plan is kept for `serve_step`."""
        wait(post(lambda: self.groups.control.recv([self._header], 0, 0)), self._idle_wait)
        command, step, generation, exchanges, capacity = (int(v) for v in self._header)
        if command == FENCE:
            raise CollectiveError(f"the router fenced step {step}: a member of the group failed")
        self.plan = (exchanges, capacity)
        return command, step, generation

    def serve_step(
        self, expert_map: ExpertMap, shards: dict[int, ExpertShard], on_counts: Callable[[int, torch.Tensor], None]
    ) -> None:
        """Follow one forward pass: for every MoE layer and each of its exchanges, receive rows, run the local
        experts, reply."""
        exchanges, capacity = self.plan
        blocks = self.fixed.blocks(expert_map.num_experts, capacity) if capacity else None
        exchange = self.fixed if blocks else self.split
        for layer in expert_map.layers:
            emax = expert_map.max_local_experts(layer)
            for _ in range(exchanges):
                exchange.serve(layer, emax, shards[layer], on_counts, blocks)
