"""Keeps the cluster at full strength, from the driver process that started it (a thread beside the gateway).

It tracks every actor by its place: worker slot w, router r and vision encoder e. It learns of a death from the
actor's `wait_stopped` call, whose ObjectRef fails when the actor dies (SIGKILL, OOM, node loss, or a kill by a
router that found a worker or an encoder hung), and starts a replacement in the same place, into the freed
placement-group bundle:
  worker:  loading -> joining (admitted by every router at a step boundary) -> serving
  router:  loading -> connecting (it forms its group with the live workers, takes the live encoders) -> serving
  encoder: loading -> serving (handed to every router; images waiting for an encoder go to it)
A worker reads only its slot's experts. The routers fail over on their own meanwhile (router/experts/channel.py),
and the gateway moves a dead router's streams to the others (router/gateway/stream_relay.py).

ReplacementPolicy says when to stop trying. Then, if some expert has no live copy left (or no router is left),
the supervisor tells the routers to give up (requests end with UNAVAILABLE naming why) and reports itself
unhealthy, so the gateway turns liveness NOT_SERVING and the orchestrator restarts the pod. Losing every vision
encoder for good ends only the requests with images (UNAVAILABLE); text keeps being served.

It also rebalances the expert map (deploy/rebalancer.py), periodically or when asked.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from cluster.actor_reports import MemberStatus, RouterHealth, RouterStats, SupervisorCounters, SupervisorStatus
from cluster.actor_state import ActorKind, MemberState
from cluster.errors import RebalanceRefused, error_summary
from cluster.expert_map import ExpertMap
from cluster.rebalance import RebalancePlan
from deploy import rebalancer
from deploy.replacement_policy import ReplacementPolicy

log = logging.getLogger(__name__)
POLL_S = 0.1
ROUTER_CHECK_S = 1.0  # how often the routers' failover counts are read (to log each failover here too)


@dataclass
class Member:
    """One place in the cluster and the actor currently in it."""

    kind: ActorKind
    index: int  # the worker slot, the router id or the encoder index
    handle: object
    state: MemberState
    lifetime: concurrent.futures.Future
    pending: concurrent.futures.Future | None = None  # the load (worker) or load + connect (router) in progress
    replacements: int = 0
    last_error: str = ""
    since: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return f"{self.kind.title} {self.index}"


class Supervisor:
    def __init__(
        self,
        routers: dict[int, object],
        workers: dict[int, object],
        expert_map: ExpertMap | None,
        encoders: dict[int, object],
        spawn: Callable[[ActorKind, int, ExpertMap | None], object],
        policy: ReplacementPolicy,
        rebalance_interval_s: float | None = None,
        extra_copies_per_worker: int = 0,
        min_copies: int = 1,
        ray_timeout_s: float = 10.0,
        load_timeout_s: float = 600.0,
    ):
        """`spawn(kind, index, expert_map)` creates a worker, router or encoder actor in its bundle (not loaded)."""
        self.map, self.spawn, self.policy = expert_map, spawn, policy
        self.rebalance_interval_s, self.extra, self.min_copies = (
            rebalance_interval_s,
            extra_copies_per_worker,
            min_copies,
        )
        self.ray_timeout_s, self.load_timeout_s = ray_timeout_s, load_timeout_s
        self.members: dict[tuple[ActorKind, int], Member] = {}
        for kind, handles in ((ActorKind.ROUTER, routers), (ActorKind.WORKER, workers), (ActorKind.ENCODER, encoders)):
            self.members |= {(kind, i): _serving(kind, i, h) for i, h in handles.items()}
        self.vision_given_up = False
        self.counters = SupervisorCounters()  # replaced whole on each change, so status() shares it safely
        self.failure: str | None = None  # set once the cluster cannot serve any more
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._next_rebalance = time.monotonic() + (rebalance_interval_s or 0)
        self._loads_at_last_rebalance: dict[int, list[int]] = {}
        self._next_router_check = 0.0
        self._failovers_seen: dict[int, int] = {}
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _of(self, kind: ActorKind) -> list[Member]:
        return sorted((m for (k, _), m in self.members.items() if k is kind), key=lambda m: m.index)

    @property
    def workers(self) -> list:
        """The current actor of every worker slot, in slot order (dead ones included until replaced)."""
        with self._lock:
            return [m.handle for m in self._of(ActorKind.WORKER)]

    @property
    def routers(self) -> list:
        """The current actor of every router, by id (dead ones included until replaced)."""
        with self._lock:
            return [m.handle for m in self._of(ActorKind.ROUTER)]

    @property
    def encoders(self) -> list:
        """The current actor of every vision encoder, by index (dead ones included until replaced)."""
        with self._lock:
            return [m.handle for m in self._of(ActorKind.ENCODER)]

    def serving_routers(self) -> list:
        with self._lock:
            return [m.handle for m in self._of(ActorKind.ROUTER) if m.state is MemberState.SERVING]

    # ---- the watch ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                with self._lock:
                    for member in list(self.members.values()):
                        self._check(member)
                    self._check_verdict()
                if time.monotonic() >= self._next_router_check:
                    self._next_router_check = time.monotonic() + ROUTER_CHECK_S
                    self._check_routers()
                if self.rebalance_interval_s and time.monotonic() >= self._next_rebalance:
                    self._next_rebalance = time.monotonic() + self.rebalance_interval_s
                    self._periodic_rebalance()
            except Exception:  # a bug here must not end supervision (logged with its traceback)
                log.exception("supervisor")

    def _check(self, m: Member) -> None:
        if m.state is not MemberState.DEAD and m.lifetime.done():
            why = _death(m.lifetime, m.name)
            if m.state is not MemberState.SERVING:
                self._replacement_failed(m, why)
            else:
                deaths = self.counters.deaths
                self._count(deaths={**deaths, m.kind: deaths.get(m.kind, 0) + 1})
                log.error("%s died (%s); replacing it", m.name, why)
            m.state, m.last_error, m.since = MemberState.DEAD, why, time.monotonic()
        elif m.pending is not None and m.pending.done():
            self._finish_pending(m)
        elif m.state is MemberState.JOINING and self._every_router_has(m.index):
            self._serving_again(m)
        if m.state is MemberState.DEAD and self.failure is None and self.policy.may_replace(_key(m)):
            self._replace(m)

    def _finish_pending(self, m: Member) -> None:
        pending, m.pending = m.pending, None
        try:
            pending.result()
        except Exception as e:  # noqa: BLE001 - a failed load or connect counts against the replacement policy
            ray.kill(m.handle, no_restart=True)
            self._replacement_failed(m, error_summary(e))
            m.state, m.since = MemberState.DEAD, time.monotonic()
            return
        if m.kind is ActorKind.ROUTER:
            self._serving_again(m)
            return
        if m.kind is ActorKind.ENCODER:
            for router in self.serving_routers():
                router.use_vision_encoders.remote({m.index: m.handle})
            self._serving_again(m)
            return
        log.info("replacement for worker slot %d loaded in %.1fs; admitting it", m.index, time.monotonic() - m.since)
        for router in self.serving_routers():
            router.admit_worker.remote(m.index, m.handle)
        m.state, m.since = MemberState.JOINING, time.monotonic()

    def _serving_again(self, m: Member) -> None:
        log.info("%s is serving again", m.name)
        m.state, m.since = MemberState.SERVING, time.monotonic()
        self._count(replacements_succeeded=self.counters.replacements_succeeded + 1)
        self.policy.succeeded(_key(m))

    def _replace(self, m: Member) -> None:
        handle = self.spawn(m.kind, m.index, self.map)
        m.handle, m.since = handle, time.monotonic()
        m.lifetime = handle.wait_stopped.remote().future()
        if m.kind is not ActorKind.ROUTER:
            m.state, m.pending = MemberState.LOADING, handle.load.remote().future()
        else:  # a router loads its weights, takes the live encoders, then forms its group with the live workers
            live = {w.index: w.handle for w in self._of(ActorKind.WORKER) if w.state.live}
            encoders = {e.index: e.handle for e in self._of(ActorKind.ENCODER) if e.state is MemberState.SERVING}
            m.state, m.pending = MemberState.CONNECTING, handle.load_and_connect.remote(live, encoders).future()
        m.replacements += 1
        self._count(replacements_started=self.counters.replacements_started + 1)
        log.warning("starting a replacement for %s (attempt %d)", m.name, m.replacements)

    def _replacement_failed(self, m: Member, why: str) -> None:
        self._count(replacements_failed=self.counters.replacements_failed + 1)
        self.policy.failed(_key(m), time.monotonic(), why)
        log.error("the replacement for %s failed: %s", m.name, why)

    def _every_router_has(self, slot: int) -> bool:
        routers = self.serving_routers()
        try:
            members = ray.get([r.channel_members.remote() for r in routers], timeout=self.ray_timeout_s)
        except (ray.exceptions.RayError, TimeoutError):
            return False
        return all(slot in m for m in members)

    def _check_verdict(self) -> None:
        if self.failure is not None or not self.policy.given_up:
            return
        self._check_vision()
        live_workers = [m.index for m in self._of(ActorKind.WORKER) if m.state.live]
        lost = self.map.uncovered(live_workers) if self.map is not None else {}
        routers = self._of(ActorKind.ROUTER)
        routers_left = [m for m in routers if m.state is not MemberState.DEAD or self.policy.may_replace(_key(m))]
        if lost:
            layer = min(lost)
            why = f"experts {lost[layer]} of layer {layer} have no live copy"
        elif not routers_left:
            why = "no router is left"
        else:
            return  # degraded, still serving
        self.failure = "; ".join(self.policy.given_up.values()) + f"; {why}"
        log.critical("giving up: %s", self.failure)
        for router in self.serving_routers():
            router.fail_cluster.remote(self.failure)

    def _check_vision(self) -> None:
        """Every vision encoder given up: tell the routers, so requests with images fail at once (text goes on)."""
        encoders = self._of(ActorKind.ENCODER)
        if self.vision_given_up or not encoders or any(self.policy.may_replace(_key(m)) for m in encoders):
            return
        self.vision_given_up = True
        why = "; ".join(self.policy.given_up.get(_key(m), "") for m in encoders)
        log.critical("giving up on the vision encoders (requests with images will fail): %s", why)
        for router in self.serving_routers():
            router.give_up_vision.remote(why)

    def _check_routers(self) -> None:
        """Log each router's completed failovers in this process's log too (the routers log them in theirs), and
        restart a router whose engine failed (its step raised: the gateway has moved its requests elsewhere)."""
        with self._lock:
            routers = {m.index: m for m in self._of(ActorKind.ROUTER) if m.state is MemberState.SERVING}
        answers: dict[int, tuple[RouterStats, RouterHealth]] = {}
        for index, m in routers.items():
            try:
                answers[index] = ray.get(
                    [m.handle.stats.remote(), m.handle.health.remote()], timeout=self.ray_timeout_s
                )
            except (ray.exceptions.RayError, TimeoutError):
                continue
        for index, (stats, health) in answers.items():
            self._log_failovers(index, stats)
            if health.failure and self.failure is None:
                log.error("router %d failed (%s); restarting it", index, health.failure)
                ray.kill(routers[index].handle, no_restart=True)

    def _log_failovers(self, index: int, stats: RouterStats) -> None:
        channel = stats.channel
        done = channel.failovers if channel else 0
        if done > self._failovers_seen.get(index, 0):
            log.warning(
                "router %d failed over (%d so far; last took %.3fs): %s; now epoch %d with workers %s",
                index,
                done,
                channel.stalls_s[-1],
                channel.last_event,
                channel.epoch,
                list(channel.members),
            )
        self._failovers_seen[index] = done

    # ---- rebalancing -------------------------------------------------------------------------------------
    def rebalance(self) -> RebalancePlan | None:
        """Recompute the map from the routed-token counts since the last rebalance and apply it without
        stopping; None when it would not improve the balance. Raises RebalanceRefused while the cluster is not at
        full strength (try again once every actor serves)."""
        with self._lock:
            if self.map is None:
                raise RebalanceRefused("the routers hold every expert (workers: 0): there is nothing to rebalance")
            if self.failure:
                raise RebalanceRefused(f"the cluster gave up: {self.failure}")
            busy = [m.name for m in self.members.values() if m.state is not MemberState.SERVING]
            if busy:
                raise RebalanceRefused(f"{', '.join(busy)} are being replaced; rebalance once they serve")
            routers, workers = self.routers, self.workers
            now = rebalancer.loads_per_expert(routers, self.ray_timeout_s)
            loads = rebalancer.difference(now, self._loads_at_last_rebalance)
            self._loads_at_last_rebalance = now
            proposal = rebalancer.plan(self.map, loads, self.extra, self.min_copies)
        if proposal is None:
            return None
        rebalancer.apply(proposal, routers, workers, self.load_timeout_s, self.ray_timeout_s)
        with self._lock:
            self.map = proposal.expert_map
            self._count(rebalances=self.counters.rebalances + 1)
        return proposal

    def _periodic_rebalance(self) -> None:
        try:
            self.rebalance()
        except RebalanceRefused as e:
            log.info("periodic rebalance skipped: %s", e)

    # ---- status ------------------------------------------------------------------------------------------
    def status(self) -> SupervisorStatus:
        with self._lock:
            given_up = self.policy.given_up
            return SupervisorStatus(
                generation=self.map.generation if self.map else 0,
                failure=self.failure,
                degraded={i: why for (k, i), why in given_up.items() if k is ActorKind.WORKER},
                degraded_routers={i: why for (k, i), why in given_up.items() if k is ActorKind.ROUTER},
                slots=tuple(_describe(m) for m in self._of(ActorKind.WORKER)),
                routers=tuple(_describe(m) for m in self._of(ActorKind.ROUTER)),
                encoders=tuple(_describe(m) for m in self._of(ActorKind.ENCODER)),
                counters=self.counters,
                expert_map=self.map,
            )

    def _count(self, **changes) -> None:
        """Publish new counters (under self._lock or on the watch thread; readers hold a snapshot)."""
        self.counters = dataclasses.replace(self.counters, **changes)


def _serving(kind: ActorKind, index: int, handle) -> Member:
    return Member(kind, index, handle, MemberState.SERVING, handle.wait_stopped.remote().future())


def _key(m: Member) -> tuple[ActorKind, int]:
    return (m.kind, m.index)


def _describe(m: Member) -> MemberStatus:
    return MemberStatus(slot=m.index, state=m.state, replacements=m.replacements, last_error=m.last_error)


def _death(lifetime: concurrent.futures.Future, name: str) -> str:
    try:
        lifetime.result(timeout=0)
    except Exception as e:  # noqa: BLE001 - ActorDiedError and kin: the reason is in the message
        return error_summary(e)
    return f"{name} shut down"
