"""The fixed-capacity exchange: decode-sized steps in two rounds of messages and no device sync. Both halves in one
class.

The step header names a capacity C: at least as many rows as any exchange of the step carries, so that no worker
can overflow (cluster/all_to_all.py rounds it up to a bucket so shapes repeat from step to step). Per exchange,
two rounds of messages on the data group, their sizes fixed by C alone, so nobody learns a count first:
  1. rows   the router sends each worker one block of Hc + C rows: Hc header rows of int32 words bit-cast into
            the rows' dtype ([fence, that worker's per-local-expert counts]), then its gated rows grouped by
            local expert (the split path's order), padded to C
  2. reply  each worker sends its block's C output rows back, padding included; the router keeps the real ones
Each round is point-to-point between the router and each worker (send/recv), not an all_to_all: the workers have
nothing to say to each other, and an all_to_all makes every pair exchange (empty) messages, which ties every
worker to the slowest and, on gloo, also hands each call to a worker thread. Measured on 2 CPU cores, one round
trip of 8 rows: 0.13 ms point-to-point vs 0.36 ms all_to_all with 1 worker, 0.23 vs 0.95 ms with 2.
A worker waiting on the router alone is not interrupted by another worker's death, nor by a closed gloo group, so
when a step fails the router sends every worker a fence block (fence word 1): a survivor waiting for rows ends its
epoch at once, as one in an all_to_all with the dead peer would. On gloo (CPU) the worker reads the fence word from
host memory, no device involved; on NCCL it does not read it (a fence aborts the communicator there).
The counts never leave the device: the router counts with `index_add_`, the worker reads them from its block and
runs its experts with device-side offsets (`ExpertShard.forward_padded`), and the router un-permutes with indices
it computed at dispatch. Padding rows are never multiplied: each expert's matmul has exactly its own rows, as on
the split path and in-process, so the results are bit-identical (tests/cluster/test_all_to_all.py).

Legend: R rows, D hidden, W world size (the router and W-1 workers), Emax most experts one slot holds, C capacity,
Hc header rows, B = Hc + C.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch

from cluster.collective import Pending, post, send_to_members, wait, wait_best_effort
from cluster.errors import CollectiveError
from cluster.experts import ExpertShard

# the router's best effort to deliver fence blocks and headers, shared by all members: a live member waiting on the
# router takes the message at once; the dead one never does, and this is what it costs the failover (a survivor the
# fence misses still fails when the router closes the epoch's group)
FENCE_WAIT = datetime.timedelta(seconds=0.1)


@dataclass(frozen=True)
class Blocks:
    """One step's message shape: `header` rows of int32 words, then `capacity` rows."""

    header: int
    capacity: int

    @property
    def rows(self) -> int:
        return self.header + self.capacity


class FixedExchange:
    def __init__(self, data, world: int, hidden: int, device: torch.device, dtype: torch.dtype, timeout):
        assert hidden * torch.finfo(dtype).bits % 32 == 0, f"rows of {hidden} x {dtype} cannot carry int32 counts"
        self.data, self.world, self.hidden, self.device, self.dtype = data, world, hidden, device, dtype
        self.timeout = timeout  # timedelta: a message that does not arrive within it fails the step (None: NCCL)
        self.fence_on_host = device.type == "cpu"  # gloo: the fence word is read (host memory, no device sync)

    def blocks(self, num_experts: int, capacity: int) -> Blocks:
        """The same for every MoE layer of a step (sized for the model's expert count), so that a fence block
        fits whichever exchange a worker waits for."""
        row_bytes = self.hidden * torch.finfo(self.dtype).bits // 8
        return Blocks(-(-4 * (1 + num_experts) // row_bytes), capacity)

    # ---- router half -------------------------------------------------------------------------------------
    def dispatch(self, dest_E, local_E, emax: int, x_RD: torch.Tensor, expert_R: torch.Tensor, blocks: Blocks):
        capacity, hc, block, workers = blocks.capacity, blocks.header, blocks.rows, self.world - 1
        assert x_RD.shape[0] <= capacity, (x_RD.shape[0], capacity)
        dest_R = dest_E[expert_R]  # ranks 1..W-1
        key_R = dest_R * emax + local_E[expert_R]
        counts_K = torch.zeros(self.world * emax, dtype=torch.int32, device=self.device)
        counts_K.index_add_(0, key_R, torch.ones_like(key_R, dtype=torch.int32))
        pos_R = _place_in_block(key_R, dest_R, counts_K.view(self.world, emax).sum(1))
        send_WBD = torch.zeros(workers, block, self.hidden, device=self.device, dtype=self.dtype)
        _words(send_WBD, hc)[:, 1 : 1 + emax] = counts_K.view(self.world, emax)[1:]
        send_WBD.view(-1, self.hidden).index_copy_(0, (dest_R - 1) * block + hc + pos_R, x_RD)
        reply_WCD = torch.empty(workers, capacity, self.hidden, device=self.device, dtype=self.dtype)
        sends, works = [], []
        for w in range(workers):  # worker w is rank w + 1
            sends.append(post(lambda w=w: self.data.send([send_WBD[w]], w + 1, 0)))
            works.append(post(lambda w=w: self.data.recv([reply_WCD[w]], w + 1, 0)))
        rows_R = (dest_R - 1) * capacity + pos_R
        finish = lambda: reply_WCD.view(-1, self.hidden).index_select(0, rows_R)  # noqa: E731
        return Pending(works, finish, self.timeout, sends)

    def fence(self, blocks: Blocks) -> None:
        """The step failed: tell every worker, best effort (the dead one's send fails, a busy one's may time out)."""
        fence_BD = torch.zeros(blocks.rows, self.hidden, device=self.device, dtype=self.dtype)
        _words(fence_BD[None], blocks.header)[0, 0] = 1
        works, _ = send_to_members(self.data, fence_BD, self.world)  # a member gone already needs none
        wait_best_effort(works, FENCE_WAIT)

    # ---- worker half -------------------------------------------------------------------------------------
    def serve(self, layer: int, emax: int, shard: ExpertShard, on_counts, blocks: Blocks) -> None:
        block_BD = self._rows(blocks.rows)
        wait(post(lambda: self.data.recv([block_BD], 0, 0)), self.timeout)
        words = _words(block_BD[None], blocks.header)[0]
        if self.fence_on_host and words[0].item():
            raise CollectiveError("the router ended the step (fence block): a member of the group failed")
        counts_E = words[1 : 1 + len(shard.experts)]
        on_counts(layer, counts_E.long())
        y_CD = shard.forward_padded(block_BD[blocks.header :], counts_E)
        wait(post(lambda: self.data.send([y_CD], 0, 0)), self.timeout)

    def _rows(self, n: int) -> torch.Tensor:
        return torch.empty(n, self.hidden, device=self.device, dtype=self.dtype)


def _place_in_block(key_R: torch.Tensor, dest_R: torch.Tensor, rows_W: torch.Tensor) -> torch.Tensor:
    """Each row's index within its destination's block: rows sorted by (rank, local expert), stable, as the split
    path sends them, so every expert sees its rows in the same order."""
    order_R = torch.argsort(key_R, stable=True)
    sorted_at_R = torch.empty_like(order_R)
    sorted_at_R[order_R] = torch.arange(order_R.shape[0], device=order_R.device)
    first_W = rows_W.cumsum(0) - rows_W
    return sorted_at_R - first_W[dest_R]


def _words(blocks_NBD: torch.Tensor, hc: int) -> torch.Tensor:
    """The int32 view of each block's header rows [N, Hc * D * bytes / 4]: [fence, counts of local experts...]."""
    n, _, d = blocks_NBD.shape
    return blocks_NBD[:, :hc].view(n, hc * d).view(torch.int32)  # views only: writes land in the block
