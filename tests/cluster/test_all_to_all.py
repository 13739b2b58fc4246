"""The all-to-all transport over real gloo process groups (a router + 3 worker processes) gives exactly the
in-process transport's expert outputs on both exchange paths, split and fixed-capacity, also with two micro-batches
in flight (uneven map, steps where some workers get no rows, replicas, a step too large for the fixed path); the
fixed path makes two collectives per MoE layer and no host sync on either side; a closed group fails a peer
blocked on it at once; and a new epoch forms from the survivors of a broken one."""

from __future__ import annotations

import datetime
import os
import signal
import time

import pytest
import torch
import torch.multiprocessing as mp

from cluster.all_to_all import FIXED_MAX_ROWS, RUN, STOP, AllToAllTransport, RouteTables
from cluster.collective import SEND_WAIT
from cluster.errors import CollectiveError
from cluster.expert_map import ExpertMap
from cluster.experts import ExpertShard
from cluster.process_group import ChannelGroups, GroupAddress, Rendezvous
from cluster.transport import LocalTransport
from deploy.bench.host_reads import HostSyncs

D, I, E, WORKERS = 16, 24, 16, 3
LAYERS = (0, 2)
HOST = "127.0.0.1"


def make_shards() -> dict[int, ExpertShard]:
    g = torch.Generator().manual_seed(0)
    return {
        layer: ExpertShard(tuple(range(E)), torch.randn(E, D, 2 * I, generator=g), torch.randn(E, I, D, generator=g))
        for layer in LAYERS
    }


def steps() -> list[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, per layer: rows and their expert ids. Step 1 sends only to experts 0-5; step 4 is too large for
    the fixed path."""
    g = torch.Generator().manual_seed(1)
    out = []
    for rows, hi in ((37, E), (4, 6), (1, E), (64, E), (FIXED_MAX_ROWS + 44, E)):
        out.append(
            {layer: (torch.randn(rows, D, generator=g), torch.randint(0, hi, (rows,), generator=g)) for layer in LAYERS}
        )
    return out


UNEVEN = "0-5;6-7,12-15;8-11"  # 6, 6 and 4 experts
REPLICATED = "0-9;6-15;0-5,10-15"  # every expert on two workers


def slot_shards(expert_map: ExpertMap, slot: int) -> dict[int, ExpertShard]:
    out = {}
    for layer, s in make_shards().items():
        mine = list(expert_map.experts_of(slot, layer))
        out[layer] = ExpertShard(tuple(mine), s.gate_up_EDI2[mine], s.down_EID[mine])
    return out


def _worker(slot: int, spec: str, addresses, results) -> None:
    """Serve each address (epoch) in turn; report the rows each step brought, and how each epoch ended."""
    expert_map = ExpertMap.from_spec(spec, E, LAYERS)
    shards = slot_shards(expert_map, slot)
    for address, rank in addresses:
        groups = ChannelGroups.join(address, rank, HOST)
        transport = AllToAllTransport(groups, D, torch.device("cpu"), torch.float32)
        rows = []
        try:
            while transport.receive_header()[0] == RUN:
                counts = []
                transport.serve_step(expert_map, shards, lambda layer, n, c=counts: c.append(int(n.sum())))
                rows.append(sum(counts))
            results.put((slot, "stopped", rows))
        except CollectiveError as e:
            results.put((slot, f"fenced: {e}", rows))
        groups.close()


def start_workers(ctx, spec, addresses_per_slot, results):
    procs = {}
    for slot, addresses in addresses_per_slot.items():
        procs[slot] = ctx.Process(target=_worker, args=(slot, spec, addresses, results))
        procs[slot].start()
    return procs


def router_groups(rendezvous, world, prefix):
    address = rendezvous.address(world, "gloo", prefix)
    return address, lambda: ChannelGroups.join(address, 0, HOST)


def run_step(transport, local, step, plan: str) -> None:
    """One step through the transport, checked against the in-process experts. `plan`: "split" (never planned),
    "fixed" (one exchange per layer) or "fixed x2" (two micro-batches, pipelined as the model runs them: the
    next one is dispatched before the previous one is combined)."""
    transport.send_header(RUN)
    parts = 1 if plan != "fixed x2" else 2
    rows = len(step[LAYERS[0]][1])
    if plan != "split":
        transport.plan_step(parts, -(-rows // parts))
    expected, pending = [], []
    for layer in LAYERS:
        x, ids = step[layer]
        for x_part, ids_part in zip(x.tensor_split(parts), ids.tensor_split(parts)):
            expected.append(local.combine(local.dispatch(layer, x_part, ids_part)))
            pending.append(transport.dispatch(layer, x_part, ids_part))
            if len(pending) > 1:
                assert torch.equal(transport.combine(pending.pop(0)), expected.pop(0))
    assert torch.equal(transport.combine(pending.pop(0)), expected.pop(0))


@pytest.mark.parametrize("plan", ["split", "fixed", "fixed x2"])
@pytest.mark.parametrize("spec", [UNEVEN, REPLICATED], ids=["uneven", "replicated"])
def test_all_to_all_equals_local_transport(spec, plan):
    expert_map = ExpertMap.from_spec(spec, E, LAYERS)
    rendezvous = Rendezvous(HOST, timeout_s=60)
    address, join = router_groups(rendezvous, WORKERS + 1, "r0/e1")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = start_workers(ctx, spec, {w: [(address, w + 1)] for w in range(WORKERS)}, results)
    try:
        transport = AllToAllTransport(join(), D, torch.device("cpu"), torch.float32)
        transport.set_routes(expert_map, tuple(range(WORKERS)))
        local = LocalTransport(make_shards())
        for step in steps():
            run_step(transport, local, step, plan)
        transport.send_header(STOP)
        reports = {slot: (how, rows) for slot, how, rows in (results.get(timeout=30) for _ in range(WORKERS))}
    finally:
        for proc in procs.values():
            proc.join(timeout=30)
    assert [proc.exitcode for proc in procs.values()] == [0] * WORKERS
    assert all(how == "stopped" for how, _ in reports.values())
    total = [sum(reports[w][1][i] for w in range(WORKERS)) for i in range(len(steps()))]
    assert total == [sum(len(s[layer][1]) for layer in LAYERS) for s in steps()]  # every row reached one copy


def test_an_experts_rows_stay_together_on_one_copy_rotating_with_the_step():
    expert_map = ExpertMap.from_spec(REPLICATED, E, LAYERS)
    routes = RouteTables(expert_map, (0, 1, 2), torch.device("cpu"))
    for expert in range(E):
        copies = expert_map.copies(0, expert)
        chosen = [int(routes.for_step(0, step)[0][expert]) - 1 for step in range(4)]
        assert chosen == [copies[(step + expert) % 2] for step in range(4)]  # ranks are slot + 1


@pytest.mark.parametrize("plan", ["split", "fixed"])
def test_closing_a_group_fails_its_peers_at_once_and_survivors_form_the_next_epoch(plan):
    """Split path: the survivors' collectives include the dead worker, so they fail at once. Fixed path: they wait
    on the router alone (point-to-point), so the router's failed step sends them a fence block."""
    # forming the second epoch waits on the router process, which on a loaded 2-core CI host was once >30 s late
    rendezvous = Rendezvous(HOST, timeout_s=60, join_timeout_s=180)
    first, join_first = router_groups(rendezvous, WORKERS + 1, "r0/e1")
    second, join_second = router_groups(rendezvous, WORKERS, "r0/e2")  # slots 0 and 1 survive
    expert_map = ExpertMap.from_spec(REPLICATED, E, LAYERS)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    epochs = {0: [(first, 1), (second, 1)], 1: [(first, 2), (second, 2)], 2: [(first, 3)]}
    procs = start_workers(ctx, REPLICATED, epochs, results)
    try:
        transport = AllToAllTransport(join_first(), D, torch.device("cpu"), torch.float32)
        transport.set_routes(expert_map, (0, 1, 2))
        x, ids = steps()[0][0]
        transport.send_header(RUN)
        for layer in LAYERS:
            transport.combine(transport.dispatch(layer, x, ids))
        os.kill(procs[2].pid, signal.SIGKILL)  # slot 2 dies between steps
        with pytest.raises(CollectiveError):
            transport.send_header(RUN)
            if plan == "fixed":
                transport.plan_step(1, len(ids))
            for layer in LAYERS:
                transport.combine(transport.dispatch(layer, x, ids))
        started = time.monotonic()
        transport.groups.close()  # the fence
        fenced = [results.get(timeout=10) for _ in range(2)]
        assert time.monotonic() - started < 5
        assert all(how.startswith("fenced") for _, how, _ in fenced)
        transport = AllToAllTransport(join_second(), D, torch.device("cpu"), torch.float32)
        transport.set_routes(expert_map, (0, 1))  # every expert has a copy on slot 0 or 1
        run_step(transport, LocalTransport(make_shards()), steps()[0], plan)
        transport.send_header(STOP)
        assert sorted(how for _, how, _ in (results.get(timeout=10) for _ in range(2))) == ["stopped", "stopped"]
    finally:
        for proc in procs.values():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


class CountingGroup:
    """A process group that counts the collectives and point-to-point messages posted on it."""

    def __init__(self, group):
        self.group, self.calls = group, 0

    def alltoall_base(self, *args):
        self.calls += 1
        return self.group.alltoall_base(*args)

    def send(self, *args):
        self.calls += 1
        return self.group.send(*args)

    def recv(self, *args):
        self.calls += 1
        return self.group.recv(*args)

    def __getattr__(self, name):
        return getattr(self.group, name)


def counted_transport(groups) -> tuple[AllToAllTransport, CountingGroup]:
    groups.data = CountingGroup(groups.data)
    return AllToAllTransport(groups, D, torch.device("cpu"), torch.float32), groups.data


def _counting_worker(slot: int, address, results) -> None:
    """Serve steps; report per step the collectives and host syncs of serving it."""
    expert_map = ExpertMap.from_spec(UNEVEN, E, LAYERS)
    shards = slot_shards(expert_map, slot)
    transport, data = counted_transport(ChannelGroups.join(address, slot + 1, HOST))
    while transport.receive_header()[0] == RUN:
        before = data.calls
        with HostSyncs() as syncs:
            transport.serve_step(expert_map, shards, lambda layer, n: None)
        results.put((slot, data.calls - before, syncs.calls))
    transport.groups.close()


@pytest.mark.parametrize(
    "plan, on_router, on_worker, reads",
    [("fixed", 2 * WORKERS, 2, (0, 1)), ("split", 3, 3, None)],
    ids=["fixed", "split"],
)
def test_collectives_and_host_syncs_per_moe_layer(plan, on_router, on_worker, reads):
    """The decode path's budget per MoE layer: two rounds of messages (rows out with their counts, rows back),
    point-to-point, so each worker posts 2 and the router 2 per worker; no host sync on the router, and on a worker
    only the fence word of its block, read from host memory on gloo (never on NCCL). The split path for
    comparison: three all_to_all collectives everyone joins, and both sides read counts on the host."""
    expert_map = ExpertMap.from_spec(UNEVEN, E, LAYERS)
    rendezvous = Rendezvous(HOST, timeout_s=60)
    address, join = router_groups(rendezvous, WORKERS + 1, "r0/e1")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_counting_worker, args=(w, address, results)) for w in range(WORKERS)]
    for proc in procs:
        proc.start()
    try:
        transport, data = counted_transport(join())
        transport.set_routes(expert_map, tuple(range(WORKERS)))
        x, ids = steps()[2][0]  # one token: a decode step of one sequence (two workers get no rows)
        transport.send_header(RUN)
        if plan == "fixed":
            transport.plan_step(1, len(ids))
        with HostSyncs() as syncs:
            for layer in LAYERS:
                transport.combine(transport.dispatch(layer, x, ids))
        transport.send_header(STOP)
        workers = [results.get(timeout=30) for _ in range(WORKERS)]
    finally:
        for proc in procs:
            proc.join(timeout=30)
    assert data.calls == on_router * len(LAYERS)
    assert all(calls == on_worker * len(LAYERS) for _, calls, _ in workers)
    if reads is not None:  # per MoE layer: the router's, each worker's
        assert syncs.calls == reads[0] * len(LAYERS)
        assert all(n == reads[1] * len(LAYERS) for _, _, n in workers)
    else:
        assert syncs.calls >= len(LAYERS) and all(n >= 2 * len(LAYERS) for _, _, n in workers)


class _Work:
    def __init__(self, waits: list, what: tuple[str, str]):
        self.waits, self.what = waits, what

    def wait(self, timeout=None):
        self.waits.append((*self.what, timeout))
        return True


class _Group:
    """Records how the transport waits for each message it posts (nothing is sent)."""

    def __init__(self, name: str, waits: list):
        self.name, self.waits = name, waits

    def send(self, tensors, rank, tag):
        return _Work(self.waits, (self.name, "send"))

    def recv(self, tensors, rank, tag):
        return _Work(self.waits, (self.name, "recv"))


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_the_routers_waits_are_bounded_on_gloo_and_stream_ordered_on_nccl(backend):
    """A gloo send to a just-killed peer may never complete, so on gloo the router bounds every message: sends by
    SEND_WAIT, replies by the collective timeout. On NCCL a bounded wait would block the host until the GPU is done
    (a host sync per exchange), so data waits carry no timeout there (the communicator's own timeout and the
    monitor's abort bound them); the step headers travel on the gloo control group and stay bounded."""
    waits: list = []
    address = GroupAddress("127.0.0.1", 1, WORKERS + 1, backend, 60.0, "r0/e1")
    groups = ChannelGroups(address, 0, _Group("control", waits), _Group("data", waits))
    transport = AllToAllTransport(groups, D, torch.device("cpu"), torch.float32)
    transport.set_routes(ExpertMap.from_spec(UNEVEN, E, LAYERS), tuple(range(WORKERS)))
    x, ids = steps()[2][0]
    transport.send_header(RUN)
    transport.plan_step(1, len(ids))
    for layer in LAYERS:
        transport.combine(transport.dispatch(layer, x, ids))
    bounds = {
        (group, kind): {timeout for g, k, timeout in waits if (g, k) == (group, kind)} for group, kind, _ in waits
    }
    assert bounds[("control", "send")] == {SEND_WAIT}
    data_sends, data_recvs = bounds[("data", "send")], bounds[("data", "recv")]
    if backend == "gloo":
        assert (data_sends, data_recvs) == ({SEND_WAIT}, {datetime.timedelta(seconds=60)})
    else:
        assert (data_sends, data_recvs) == ({None}, {None})
    assert len(waits) == WORKERS + 2 * WORKERS * len(LAYERS)  # a header per member; per layer a block each way
