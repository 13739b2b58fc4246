"""The fixed-capacity exchange: decode-sized steps in two collectives and no host sync. Both halves in one class.

The step header names a capacity C: at least as many rows as any exchange of the step carries, so that no worker
can overflow (cluster/all_to_all.py rounds it up to a bucket so shapes repeat from step to step). Per exchange,
two `all_to_all_single` calls on the data group, their splits fixed by C alone, so nobody learns a count first:
  1. rows   the router sends each worker one block of Hc + C rows: Hc header rows holding that worker's
            per-local-expert counts (int32, bit-cast into the rows' dtype), then its gated rows grouped by local
            expert (the split path's order), padded to C
  2. reply  each worker sends its block's C output rows back, padding included; the router keeps the real ones
The counts never leave the device: the router counts with `index_add_`, the worker reads them from its block and
runs its experts with device-side offsets (`ExpertShard.forward_padded`), and the router un-permutes with indices
it computed at dispatch. Padding rows are never multiplied: each expert's matmul has exactly its own rows, as on
the split path and in-process, so the results are bit-identical (tests/cluster/test_all_to_all.py).

Legend: R rows, D hidden, W world size, Emax most experts one slot holds, C capacity, Hc header rows, B = Hc + C.
"""

from __future__ import annotations

import torch

from cluster.collective import Pending, post, wait
from cluster.experts import ExpertShard


class FixedExchange:
    def __init__(self, data, world: int, hidden: int, device: torch.device, dtype: torch.dtype, options):
        assert hidden * torch.finfo(dtype).bits % 32 == 0, f"rows of {hidden} x {dtype} cannot carry int32 counts"
        self.data, self.world, self.hidden, self.device, self.dtype = data, world, hidden, device, dtype
        self.options = options  # AllToAllOptions: the collective timeout
        self.nothing = [0] * world

    # ---- router half -------------------------------------------------------------------------------------
    def dispatch(self, dest_E, local_E, emax: int, x_RD: torch.Tensor, expert_R: torch.Tensor, capacity: int):
        assert x_RD.shape[0] <= capacity, (x_RD.shape[0], capacity)
        hc, workers = self.header_rows(emax), self.world - 1
        block = hc + capacity
        dest_R = dest_E[expert_R]  # ranks 1..W-1
        key_R = dest_R * emax + local_E[expert_R]
        counts_K = torch.zeros(self.world * emax, dtype=torch.int32, device=self.device)
        counts_K.index_add_(0, key_R, torch.ones_like(key_R, dtype=torch.int32))
        pos_R = _place_in_block(key_R, dest_R, counts_K.view(self.world, emax).sum(1))
        send_WBD = torch.zeros(workers, block, self.hidden, device=self.device, dtype=self.dtype)
        _counts(send_WBD, hc)[:, :emax] = counts_K.view(self.world, emax)[1:]
        send_WBD.view(-1, self.hidden).index_copy_(0, (dest_R - 1) * block + hc + pos_R, x_RD)
        reply_RD = self._rows(workers * capacity)
        data, opts = self.data, self.options
        works = [
            post(
                lambda: data.alltoall_base(
                    self._rows(0), send_WBD.view(-1, self.hidden), self.nothing, [0] + [block] * workers, opts
                )
            ),
            post(lambda: data.alltoall_base(reply_RD, self._rows(0), [0] + [capacity] * workers, self.nothing, opts)),
        ]
        return Pending(works, lambda: reply_RD.index_select(0, (dest_R - 1) * capacity + pos_R))

    # ---- worker half -------------------------------------------------------------------------------------
    def serve(self, layer: int, emax: int, shard: ExpertShard, on_counts, capacity: int) -> None:
        hc = self.header_rows(emax)
        data, opts = self.data, self.options
        block_BD = self._rows(hc + capacity)
        from_router = [hc + capacity] + [0] * (self.world - 1)
        wait(post(lambda: data.alltoall_base(block_BD, self._rows(0), from_router, self.nothing, opts)))
        counts_E = _counts(block_BD[None], hc)[0, : len(shard.experts)]
        on_counts(layer, counts_E.long())
        y_CD = shard.forward_padded(block_BD[hc:], counts_E)
        to_router = [capacity] + [0] * (self.world - 1)
        wait(post(lambda: data.alltoall_base(self._rows(0), y_CD, self.nothing, to_router, opts)))

    def header_rows(self, emax: int) -> int:
        row_bytes = self.hidden * torch.finfo(self.dtype).bits // 8
        return -(-4 * emax // row_bytes)

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


def _counts(blocks_NBD: torch.Tensor, hc: int) -> torch.Tensor:
    """The int32 view of each block's header rows [N, Hc * D * bytes / 4]."""
    n, _, d = blocks_NBD.shape
    return blocks_NBD[:, :hc].view(n, hc * d).view(torch.int32)  # views only: writes land in the block
