"""The router's channel to its expert workers: the current epoch's group, who is in it, and failover.

The life of a failover (one router's view; every router has its own channel and recovers on its own):

  detect   a collective of the step raises (gloo: the dead peer's sockets reset at once), or the monitor sees a
           member's loop end (the actor died, or its loop raised) or a step make no progress for hang_timeout_s
           (then members that do not answer a ping are killed, which resets their sockets)
  fence    abort (NCCL: never wait for its timeout) and close this epoch's groups, and ask every member to close
           its side, so nobody stays blocked on the dead peer
  settle   each member's loop call ends (a LoopEnd): FENCED (alive), DEAD, or FAILED (killed); one that does not
           end and does not answer a ping is killed too
  hold     while some expert has no live copy (one copy per expert and its only holder died), wait for the
           supervisor to admit a replacement; requests wait, none fail, unless the supervisor gives up
  regroup  form the next epoch's group from the survivors (and any admitted replacement)
  replay   run the same forward pass again: the router holds all state, KV writes are idempotent, sampling has
           not happened yet, so no token is lost or emitted twice

Replacements and rebalanced maps arrive from the supervisor (`admit`, `use_map`, any thread) and are applied at
a step boundary (`maintain`, called by the engine thread between steps and while idle).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from cluster.actor_reports import ChannelStats
from cluster.actor_state import ChannelState, LoopEnd, LoopEndKind
from cluster.all_to_all import REGROUP, RUN, STOP
from cluster.errors import ClusterFailure, CollectiveError
from cluster.expert_map import ExpertMap
from cluster.process_group import GroupAddress
from router.experts.liveness import kill_silent
from router.experts.monitor import ChannelMonitor
from router.experts.settings import ChannelSettings
from router.experts.worker_link import WorkerLink

log = logging.getLogger(__name__)
T = TypeVar("T")


class ExpertChannel:
    def __init__(
        self,
        router: int,
        expert_map: ExpertMap,
        links: dict[int, WorkerLink],
        address_for: Callable[[int, str], GroupAddress],
        join: Callable[[GroupAddress], object],
        make_transport: Callable[[object], object],
        backend: str,
        settings: ChannelSettings = ChannelSettings(),
    ):
        """`address_for(world_size, prefix)` names an epoch's rendezvous; `join(address)` joins it as rank 0 and
        returns the groups; `make_transport(groups)` wraps them (AllToAllTransport in production)."""
        self.router, self.map, self.links = router, expert_map, dict(links)
        self.address_for, self.join, self.make_transport = address_for, join, make_transport
        self.backend, self.settings = backend, settings
        self.stats = ChannelStats(map_generation=expert_map.generation)  # replaced whole on each change (`_note`)
        self._stats_lock = threading.Lock()
        self.transport = None
        self.loops: dict[int, concurrent.futures.Future] = {}
        self.step_started: float | None = None
        self._lock = threading.Condition()
        self._admitted: dict[int, WorkerLink] = {}
        self._next_map: ExpertMap | None = None
        self._failure: str | None = None
        self._steps = 0
        self.monitor = ChannelMonitor(self)

    @property
    def members(self) -> tuple[int, ...]:
        """The worker slots of the current epoch."""
        return self.stats.members

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def open(self) -> None:
        """Form the first group with every worker that can join (holding while an expert has no live copy)."""
        self.monitor.start()
        self._establish(set(self.links))
        self._note(state=ChannelState.SERVING)

    def close(self) -> None:
        """STOP the members' loops (best effort) and close the group."""
        self.monitor.stop()
        if self.transport is not None and self.stats.state is ChannelState.SERVING:
            try:
                self.transport.send_header(STOP)
            except CollectiveError as e:
                log.info("router %d: could not send STOP: %s", self.router, e)
        self._close_groups()
        self._note(state=ChannelState.STOPPED)

    # ---- the step ----------------------------------------------------------------------------------------
    def run(self, forward: Callable[[object], T]) -> T:
        """One forward pass over the group, replayed after a failover until it completes (ClusterFailure if the
        supervisor gave up)."""
        self.maintain()
        while True:
            self._check_failed()
            self.step_started = time.monotonic()
            try:
                self.transport.send_header(RUN)
                return forward(self.transport)
            except CollectiveError as e:
                self.step_started = None
                self._recover(f"step failed: {e}")
                self._note(replayed_steps=self.stats.replayed_steps + 1)
            finally:
                self.step_started = None

    def maintain(self) -> None:
        """Between steps: recover from a death seen while idle, admit replacements, switch to a new map."""
        self._check_failed()
        if self.monitor.lost_member.is_set():
            self._recover("a member was lost between steps")
        with self._lock:
            admitted, self._admitted = self._admitted, {}
            next_map, self._next_map = self._next_map, None
        if next_map is not None:
            self.map = next_map
            self.transport.set_routes(next_map, self.stats.members)
            self._note(map_generation=next_map.generation)
            log.info("router %d: switched to expert map generation %d", self.router, next_map.generation)
        if admitted:
            self._planned_regroup(admitted)

    # ---- from the supervisor (any thread) ----------------------------------------------------------------
    def admit(self, link: WorkerLink) -> None:
        """A (replacement) worker has loaded its slot's experts: add it at the next step boundary."""
        with self._lock:
            self._admitted[link.slot] = link
            self._lock.notify_all()

    def use_map(self, expert_map: ExpertMap) -> None:
        """Every worker holds `expert_map`'s experts: address rows by it from the next step on."""
        with self._lock:
            self._next_map = expert_map

    def fail(self, reason: str) -> None:
        """Give up: the current and every later step raise ClusterFailure(reason)."""
        with self._lock:
            self._failure = reason
            self._lock.notify_all()
        self._note(state=ChannelState.FAILED, last_event=reason)
        if self.transport is not None:
            self.transport.groups.abort()

    # ---- failover ----------------------------------------------------------------------------------------
    def _recover(self, reason: str) -> None:
        started = time.monotonic()
        self._note(state=ChannelState.RECOVERING, last_event=reason)
        log.warning(
            "router %d: %s; fencing epoch %d (members %s)",
            self.router,
            reason,
            self.stats.epoch,
            list(self.stats.members),
        )
        self._establish(self._fence_and_settle())
        stall = time.monotonic() - started
        with self._stats_lock:
            self.stats = replace(self.stats.with_stall(stall), state=ChannelState.SERVING)
        self.monitor.lost_member.clear()
        log.warning(
            "router %d: failover done in %.3fs: epoch %d with workers %s",
            self.router,
            stall,
            self.stats.epoch,
            list(self.stats.members),
        )

    def _establish(self, live: set[int]) -> None:
        """Form a group from `live` (and any admitted replacement) once every expert has a live copy; if that
        fails (a member died meanwhile), settle and try again. Raises ClusterFailure if the supervisor gives up."""
        while True:
            live |= self._take_admitted()
            lost = self.map.uncovered(live)
            if lost:
                self._note(state=ChannelState.HOLDING)
                self._hold(lost, live)
                live = self._still_alive(live)  # time has passed: one of them may have died meanwhile
                continue
            try:
                self._form(tuple(sorted(live)))
                return
            except (CollectiveError, RuntimeError, concurrent.futures.TimeoutError) as e:
                log.warning(
                    "router %d: forming a group with %s failed (%s); settling again", self.router, sorted(live), e
                )
                live = self._fence_and_settle()

    def _fence_and_settle(self) -> set[int]:
        """Close this epoch everywhere, then find which members are still alive."""
        self._close_groups()
        for slot in self.loops:
            self.links[slot].fence(self.router)
        return self._settle(self.settings.ping_timeout_s)

    def _settle(self, timeout_s: float) -> set[int]:
        """Wait (bounded) for every member's loop call to end; kill the ones that are hung or failed."""
        loops = dict(self.loops)
        concurrent.futures.wait(list(loops.values()), timeout=timeout_s)
        pending = [self.links[slot] for slot, loop in loops.items() if not loop.done()]
        hung = {
            link.slot for link in kill_silent(pending, self.settings.ping_timeout_s, self.router, "does not answer")
        }
        live = set()
        for slot, loop in loops.items():
            link = self.links[slot]
            if slot in hung:
                end = LoopEnd(LoopEndKind.DEAD, f"expert worker {slot} hung")
            else:
                end = link.outcome(loop) if loop.done() else LoopEnd(LoopEndKind.FENCED)
            if end.alive:
                live.add(slot)
                continue
            if end.kind is LoopEndKind.FAILED:
                link.kill()
            log.error("router %d: %s", self.router, end.describe())
            del self.links[slot]
        self.loops = {}
        return live

    def _still_alive(self, slots: set[int]) -> set[int]:
        """The slots whose worker answers a ping (a dead actor fails at once); the others are killed and dropped."""
        links = [self.links[s] for s in slots if s in self.links]
        gone = {link.slot for link in kill_silent(links, self.settings.ping_timeout_s, self.router, "is gone")}
        for slot in gone:
            del self.links[slot]
        return {link.slot for link in links} - gone

    def _hold(self, lost: dict[int, list[int]], live: set[int]) -> None:
        detail = ", ".join(f"layer {layer}: {experts}" for layer, experts in sorted(lost.items())[:3])
        self._note(last_event=f"holding steps: no live copy of experts ({detail}); waiting for a replacement")
        log.warning("router %d: %s (live workers %s)", self.router, self.stats.last_event, sorted(live))
        with self._lock:
            while not self._admitted and self._failure is None:
                self._lock.wait(timeout=1.0)
        self._check_failed()

    def _planned_regroup(self, admitted: dict[int, WorkerLink]) -> None:
        """Add workers at a step boundary: members leave this epoch (REGROUP), then the next one forms."""
        with self._lock:
            self._admitted.update(admitted)
        try:
            self.transport.send_header(REGROUP)
            live = self._settle(self.settings.join_timeout_s)
            self._close_groups()
            live |= self._take_admitted()
            self._form(tuple(sorted(live)))
        except (CollectiveError, RuntimeError, concurrent.futures.TimeoutError) as e:
            self._recover(f"regroup failed: {e}")
            return
        self._note(regroups=self.stats.regroups + 1, state=ChannelState.SERVING)

    def _take_admitted(self) -> set[int]:
        with self._lock:
            admitted, self._admitted = self._admitted, {}
        self.links.update(admitted)
        return set(admitted)

    def _form(self, slots: tuple[int, ...]) -> None:
        self._note(epoch=self.stats.epoch + 1)
        address = self.address_for(1 + len(slots), f"r{self.router}/e{self.stats.epoch}")
        self.loops = {slot: self.links[slot].serve(self.router, address, rank) for rank, slot in enumerate(slots, 1)}
        self._note(members=slots)
        groups = self._join_watching(address)
        transport = self.make_transport(groups)
        transport.set_routes(self.map, slots)
        transport.steps = self._steps_so_far()
        self.transport = transport
        self.monitor.watch(self.loops)

    def _join_watching(self, address: GroupAddress):
        """Join as rank 0 while watching the members: one whose loop call ends before the group has formed (it
        died, or its own join failed) means the group cannot form; say so now rather than at the join timeout
        (the abandoned join ends by itself at that timeout)."""
        joined: concurrent.futures.Future = concurrent.futures.Future()

        def join() -> None:
            try:
                joined.set_result(self.join(address))
            except Exception as e:  # noqa: BLE001 - handed to the waiting thread below
                joined.set_exception(e)

        threading.Thread(target=join, name=f"join-r{self.router}-{address.prefix}", daemon=True).start()
        while True:
            concurrent.futures.wait([joined, *self.loops.values()], return_when=concurrent.futures.FIRST_COMPLETED)
            if joined.done():
                return joined.result()
            ended = sorted(slot for slot, loop in self.loops.items() if loop.done())
            if ended:
                raise CollectiveError(f"workers {ended} left before the group of epoch {self.stats.epoch} formed")

    def _close_groups(self) -> None:
        self.monitor.watch({})
        if self.transport is not None:
            self.transport.groups.close()

    def _steps_so_far(self) -> int:
        return self.transport.steps if self.transport is not None else 0

    def _note(self, **changes) -> None:
        """Publish a new ChannelStats (readers on other threads see either the old one or the new one whole)."""
        with self._stats_lock:
            self.stats = replace(self.stats, **changes)

    def _check_failed(self) -> None:
        with self._lock:
            failure = self._failure
        if failure is not None:
            raise ClusterFailure(failure)
