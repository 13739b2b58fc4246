"""The all-to-all transport over a real gloo process group (one router + 3 worker processes) gives exactly the
in-process transport's expert outputs: uneven placement, top-2, and layers where some workers get no rows."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from cluster.all_to_all import RUN, STOP, AllToAllTransport
from cluster.experts import ExpertShard
from cluster.placement import ExpertPlacement
from cluster.process_group import RankLayout, Rendezvous, join_groups, leave_groups
from cluster.transport import LocalTransport

D, I, E, WORKERS = 16, 24, 16, 3
LAYERS = (0, 2)


def make_shards() -> dict[int, ExpertShard]:
    g = torch.Generator().manual_seed(0)
    return {
        layer: ExpertShard(tuple(range(E)), torch.randn(E, D, 2 * I, generator=g), torch.randn(E, I, D, generator=g))
        for layer in LAYERS
    }


def steps() -> list[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, per layer: rows and their expert ids. Step 1 sends only to experts 0-5 (worker 0)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for rows, hi in ((37, E), (4, 6), (1, E), (64, E)):
        out.append(
            {layer: (torch.randn(rows, D, generator=g), torch.randint(0, hi, (rows,), generator=g)) for layer in LAYERS}
        )
    return out


def placement() -> ExpertPlacement:
    return ExpertPlacement.from_spec("0-5;6-7,12-15;8-11", E, LAYERS)  # 6, 6 and 4 experts: uneven


def _worker(rank: int, address, layout) -> None:
    groups = join_groups(address, rank)
    w = layout.worker_of(rank)
    p = placement()
    shards = {
        layer: ExpertShard(
            p.experts_of(w, layer),
            s.gate_up_EDI2[list(p.experts_of(w, layer))],
            s.down_EID[list(p.experts_of(w, layer))],
        )
        for layer, s in make_shards().items()
    }
    transport = AllToAllTransport(layout, groups, p, D, torch.device("cpu"), torch.float32)
    while transport.receive_header() == RUN:
        transport.serve_step(shards, lambda layer, counts: None)
    leave_groups()


def test_all_to_all_equals_local_transport():
    layout = RankLayout(1, WORKERS)
    rendezvous = Rendezvous(layout.world_size, "gloo", timeout_s=60, host="127.0.0.1")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, rendezvous.address, layout)) for r in range(1, layout.world_size)]
    for proc in procs:
        proc.start()
    try:
        groups = join_groups(rendezvous.address, 0, store=rendezvous.store)
        transport = AllToAllTransport(layout, groups, placement(), D, torch.device("cpu"), torch.float32)
        local = LocalTransport(make_shards())
        for step in steps():
            transport.send_header(RUN)
            for layer in LAYERS:
                x, ids = step[layer]
                got = transport.combine(transport.dispatch(layer, x, ids))
                assert torch.equal(got, local.combine(local.dispatch(layer, x, ids)))
        transport.send_header(STOP)
    finally:
        for proc in procs:
            proc.join(timeout=30)
        leave_groups()
    assert [proc.exitcode for proc in procs] == [0] * WORKERS
