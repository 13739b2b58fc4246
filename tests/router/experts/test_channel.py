"""The router's failover logic with the collectives and the workers faked, so the NCCL path's decisions are
covered on a machine where two NCCL ranks cannot run: a dead peer makes a fake NCCL collective block until the
group is aborted (as real NCCL does until its timeout), a fake gloo collective raises at once (as gloo does on a
reset socket). The channel must abort instead of waiting, regroup with the survivors, hold while an expert has no
live copy, admit replacements, kill what hangs, and replay the step."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from cluster.actor_state import FENCED, REGROUPED, STOPPED, ChannelState, LoopEnd, LoopEndKind
from cluster.all_to_all import REGROUP, RUN, STOP
from cluster.errors import ClusterFailure, CollectiveError
from cluster.expert_map import ExpertMap
from cluster.process_group import GroupAddress
from router.experts.channel import ExpertChannel
from router.experts.settings import ChannelSettings

NCCL_TIMEOUT_S = 30.0  # what a fake NCCL collective would wait without an abort
SETTINGS = ChannelSettings(join_timeout_s=5.0, hang_timeout_s=0.5, ping_timeout_s=0.3, poll_s=0.02)


class FakeWorkers:
    """The workers' side: which are alive, hung or dead, and each one's loop call of the current epoch."""

    def __init__(self, slots):
        self.state = {slot: "alive" for slot in slots}
        self.loops: dict[int, concurrent.futures.Future] = {}
        self.lock = threading.Lock()

    def end_loop(self, slot, result=None, error=None):
        with self.lock:
            loop = self.loops.pop(slot, None)
        if loop is not None and not loop.done():
            loop.set_exception(error) if error else loop.set_result(result)

    def kill(self, slot):
        self.state[slot] = "dead"
        self.end_loop(slot, error=RuntimeError(f"worker {slot} died"))


class FakeLink:
    def __init__(self, slot, workers: FakeWorkers):
        self.slot, self.workers = slot, workers
        self.killed = False

    def serve(self, router, address, rank):
        loop = concurrent.futures.Future()
        if self.workers.state[self.slot] == "dead":
            loop.set_exception(RuntimeError(f"worker {self.slot} died"))
        with self.workers.lock:
            self.workers.loops[self.slot] = loop
        return loop

    def outcome(self, loop):
        try:
            return loop.result(timeout=0)
        except RuntimeError as e:
            return LoopEnd(LoopEndKind.DEAD, str(e))

    def ping(self, timeout_s):
        if self.workers.state[self.slot] == "hung":
            time.sleep(timeout_s)
            return False
        return self.workers.state[self.slot] == "alive"

    def fence(self, router):
        if self.workers.state[self.slot] == "alive":
            self.workers.end_loop(self.slot, FENCED)

    def kill(self):
        self.killed = True
        self.workers.kill(self.slot)


class FakeGroups:
    def __init__(self, members):
        self.members, self.aborted, self.closed = members, threading.Event(), False

    def abort(self):
        self.aborted.set()

    def close(self):
        self.closed = True
        self.abort()


class FakeTransport:
    """The collectives: a step exchanges with every member. Results are the members that served it."""

    def __init__(self, groups: FakeGroups, backend: str, workers: FakeWorkers, log: list):
        self.groups, self.backend, self.workers, self.log = groups, backend, workers, log
        self.steps, self.routes = 0, None

    def set_routes(self, expert_map, members):
        self.routes = (expert_map.generation, tuple(members))

    def send_header(self, command):
        self.log.append(("header", command, self.groups.members))
        if self.groups.closed:
            raise CollectiveError("group closed")
        if command == REGROUP:
            for slot in self.groups.members:
                self.workers.end_loop(slot, REGROUPED)
        elif command == STOP:
            for slot in self.groups.members:
                self.workers.end_loop(slot, STOPPED)
        self.steps += command == RUN

    def exchange(self):
        deadline = time.monotonic() + NCCL_TIMEOUT_S
        while True:
            bad = [s for s in self.groups.members if self.workers.state[s] != "alive"]
            if not bad:
                return self.groups.members
            dead = [s for s in bad if self.workers.state[s] == "dead"]
            if self.backend == "gloo" and dead:
                raise CollectiveError(f"Connection reset by peer {dead}")  # gloo: at once
            if self.groups.aborted.is_set():
                raise CollectiveError("NCCL communicator aborted")
            if time.monotonic() > deadline:
                raise CollectiveError("timed out")  # the outcome the channel must never wait for
            time.sleep(0.005)


def make_channel(backend: str, expert_map: ExpertMap, workers: FakeWorkers, log: list):
    links = {slot: FakeLink(slot, workers) for slot in range(expert_map.num_workers)}

    def address_for(world, prefix):
        return GroupAddress("127.0.0.1", 1, world, backend, 60.0, prefix)

    channel = ExpertChannel(
        0,
        expert_map,
        links,
        address_for,
        join=lambda address: FakeGroups(tuple(sorted(workers.loops))),
        make_transport=lambda groups: FakeTransport(groups, backend, workers, log),
        backend=backend,
        settings=SETTINGS,
    )
    channel.open()
    return channel, links


def step(channel):
    return channel.run(lambda transport: transport.exchange())


def kill_during_next_step(workers, slot, delay_s=0.2):
    threading.Timer(delay_s, workers.kill, args=(slot,)).start()


@pytest.fixture
def log():
    return []


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_a_death_mid_step_aborts_regroups_with_the_survivors_and_replays(backend, log):
    workers = FakeWorkers(range(3))
    channel, _ = make_channel(backend, ExpertMap.even(6, [0], 3, replicas=2), workers, log)
    assert step(channel) == (0, 1, 2)
    workers.state[1] = "slow"  # the next step blocks on worker 1 ...
    kill_during_next_step(workers, 1)  # ... which then dies
    started = time.monotonic()
    assert step(channel) == (0, 2)  # replayed on the survivors, every expert still has a copy
    assert time.monotonic() - started < 5, "the channel waited for the collective's timeout"
    assert channel.stats.members == (0, 2) and channel.stats.epoch == 2
    assert channel.stats.failovers == 1 and channel.stats.replayed_steps == 1
    channel.close()


def test_nccl_is_aborted_by_the_monitor_without_waiting_for_the_step_to_fail(log):
    workers = FakeWorkers(range(2))
    channel, _ = make_channel("nccl", ExpertMap.even(4, [0], 2, replicas=2), workers, log)
    old_groups = channel.transport.groups
    workers.state[1] = "slow"
    kill_during_next_step(workers, 1, delay_s=0.3)
    assert step(channel) == (0,)
    assert old_groups.aborted.is_set() and old_groups.closed
    channel.close()


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_a_worker_that_hangs_is_pinged_killed_and_replaced_in_the_group(backend, log):
    workers = FakeWorkers(range(3))
    channel, links = make_channel(backend, ExpertMap.even(6, [0], 3, replicas=2), workers, log)
    workers.state[2] = "hung"  # SIGSTOP: alive to the OS, silent to everyone
    started = time.monotonic()
    assert step(channel) == (0, 1)
    took = time.monotonic() - started
    assert links[2].killed and took < SETTINGS.hang_timeout_s + 3 * SETTINGS.ping_timeout_s + 1
    channel.close()


def test_without_a_live_copy_steps_hold_until_a_replacement_is_admitted(log):
    workers = FakeWorkers(range(2))
    channel, _ = make_channel("gloo", ExpertMap.even(4, [0], 2), workers, log)  # one copy per expert
    workers.kill(1)
    result = {}
    runner = threading.Thread(target=lambda: result.update(members=step(channel)))
    runner.start()
    time.sleep(0.5)
    assert runner.is_alive() and channel.stats.state is ChannelState.HOLDING  # waiting, not failing
    workers.state[1] = "alive"  # the replacement, loaded
    channel.admit(FakeLink(1, workers))
    runner.join(timeout=5)
    assert result["members"] == (0, 1) and channel.stats.state is ChannelState.SERVING
    channel.close()


def test_when_the_supervisor_gives_up_a_holding_step_fails_with_its_reason(log):
    workers = FakeWorkers(range(2))
    channel, _ = make_channel("gloo", ExpertMap.even(4, [0], 2), workers, log)
    workers.kill(0)
    threading.Timer(0.3, channel.fail, args=("slot 0: 3 replacements failed",)).start()
    with pytest.raises(ClusterFailure, match="3 replacements failed"):
        step(channel)
    with pytest.raises(ClusterFailure):
        step(channel)  # and every later one


def test_an_admitted_worker_joins_at_a_step_boundary_by_a_planned_regroup(log):
    workers = FakeWorkers(range(3))
    channel, _ = make_channel("gloo", ExpertMap.even(6, [0], 3, replicas=2), workers, log)
    workers.kill(2)
    assert step(channel) == (0, 1)
    workers.state[2] = "alive"
    channel.admit(FakeLink(2, workers))
    assert step(channel) == (0, 1, 2)  # maintain() regrouped before this step
    assert ("header", REGROUP, (0, 1)) in log and channel.stats.regroups == 1
    channel.close()
    assert log[-1] == ("header", STOP, (0, 1, 2))


def test_a_death_while_idle_is_recovered_at_the_next_boundary(log):
    workers = FakeWorkers(range(2))
    channel, _ = make_channel("gloo", ExpertMap.even(4, [0], 2, replicas=2), workers, log)
    workers.kill(0)
    deadline = time.monotonic() + 5
    while not channel.monitor.lost_member.is_set():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    channel.maintain()
    assert channel.stats.members == (1,) and channel.stats.failovers == 1
    assert step(channel) == (1,)
    channel.close()
