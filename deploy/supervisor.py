"""Keeps the expert plane at full strength, from the driver process that started it (a thread beside the gateway).

Per worker slot it tracks an actor and its state: loading -> joining -> serving, or dead. It learns of a death
from the worker's `wait_stopped` call, whose ObjectRef fails when the actor dies (SIGKILL, OOM, node loss, or a
kill by a router that found it hung), and then starts a replacement in the same slot, into the freed
placement-group bundle: it reads only that slot's experts, and once loaded it is admitted by every router at a
step boundary. The routers meanwhile fail over on their own (router/expert_channel.py). ReplacementPolicy says
when to stop trying; then, if some expert has no live copy left, the supervisor tells the routers to give up
(requests end with UNAVAILABLE naming why) and reports itself unhealthy (liveness NOT_SERVING).

It also rebalances: from the tokens the routers counted per expert, a new map with extra copies of hot experts
(cluster/rebalance.py), applied without stopping: workers load the new copies in the background, the routers
switch at a step boundary, then the workers free what the new map no longer needs.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from cluster.errors import error_summary
from cluster.expert_map import ExpertMap
from cluster.rebalance import RebalancePlan, plan_rebalance
from deploy.replacement_policy import ReplacementPolicy

log = logging.getLogger(__name__)
POLL_S = 0.1
ROUTER_CHECK_S = 1.0  # how often the routers' failover counts are read (to log each failover here too)


@dataclass
class SlotState:
    slot: int
    handle: object
    state: str  # loading | joining | serving | dead
    lifetime: concurrent.futures.Future
    loading: concurrent.futures.Future | None = None
    replacements: int = 0
    last_error: str = ""
    since: float = field(default_factory=time.monotonic)


@dataclass
class SupervisorCounters:
    worker_deaths: int = 0
    replacements_started: int = 0
    replacements_succeeded: int = 0
    replacements_failed: int = 0
    rebalances: int = 0


class Supervisor:
    def __init__(
        self,
        routers: list,
        workers: dict[int, object],
        expert_map: ExpertMap,
        spawn_worker: Callable[[int, ExpertMap], object],
        policy: ReplacementPolicy,
        rebalance_interval_s: float | None = None,
        extra_copies_per_worker: int = 0,
        min_copies: int = 1,
        ray_timeout_s: float = 10.0,
        load_timeout_s: float = 600.0,
    ):
        """`spawn_worker(slot, expert_map)` creates a worker actor in the slot's bundle (not yet loaded)."""
        self.routers, self.map, self.spawn_worker, self.policy = routers, expert_map, spawn_worker, policy
        self.rebalance_interval_s, self.extra, self.min_copies = (
            rebalance_interval_s,
            extra_copies_per_worker,
            min_copies,
        )
        self.ray_timeout_s, self.load_timeout_s = ray_timeout_s, load_timeout_s
        self.slots = {
            slot: SlotState(slot, h, "serving", h.wait_stopped.remote().future()) for slot, h in workers.items()
        }
        self.counters = SupervisorCounters()
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

    @property
    def workers(self) -> list:
        """The current actor of every slot, in slot order (dead ones included until replaced)."""
        with self._lock:
            return [self.slots[s].handle for s in sorted(self.slots)]

    # ---- the watch ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                with self._lock:
                    for st in list(self.slots.values()):
                        self._check(st)
                    self._check_verdict()
                if time.monotonic() >= self._next_router_check:
                    self._next_router_check = time.monotonic() + ROUTER_CHECK_S
                    self._report_failovers()
                if self.rebalance_interval_s and time.monotonic() >= self._next_rebalance:
                    self._next_rebalance = time.monotonic() + self.rebalance_interval_s
                    self._periodic_rebalance()
            except Exception:  # a bug here must not end supervision (logged with its traceback)
                log.exception("supervisor")

    def _check(self, st: SlotState) -> None:
        if st.state in ("serving", "joining", "loading") and st.lifetime.done():
            why = _death(st.lifetime, st.slot)
            if st.state == "loading" or (st.state == "joining" and st.replacements):
                self._replacement_failed(st, why)
            else:
                self.counters.worker_deaths += 1
                log.error("expert worker %d died (%s); replacing it", st.slot, why)
            st.state, st.last_error, st.since = "dead", why, time.monotonic()
        elif st.state == "loading" and st.loading is not None and st.loading.done():
            try:
                st.loading.result()
            except Exception as e:  # noqa: BLE001 - a failed load counts against the replacement policy
                ray.kill(st.handle, no_restart=True)
                self._replacement_failed(st, error_summary(e))
                st.state, st.since = "dead", time.monotonic()
                return
            log.info(
                "replacement for worker slot %d loaded in %.1fs; admitting it", st.slot, time.monotonic() - st.since
            )
            for router in self.routers:
                router.admit_worker.remote(st.slot, st.handle)
            st.state, st.since = "joining", time.monotonic()
        elif st.state == "joining" and self._all_routers_have(st.slot):
            log.info("worker slot %d is serving again", st.slot)
            st.state, st.since = "serving", time.monotonic()
            self.counters.replacements_succeeded += 1
            self.policy.succeeded(st.slot)
        if st.state == "dead" and self.failure is None and self.policy.may_replace(st.slot):
            self._replace(st)

    def _report_failovers(self) -> None:
        """Log each router's completed failovers in this process's log too (the routers log them in theirs)."""
        try:
            stats = ray.get([r.stats.remote() for r in self.routers], timeout=self.ray_timeout_s)
        except (ray.exceptions.RayError, TimeoutError):
            return
        for router, s in enumerate(stats):
            channel = s["channel"] or {}
            done = channel.get("failovers", 0)
            if done > self._failovers_seen.get(router, 0):
                log.warning(
                    "router %d failed over (%d so far; last took %.3fs): %s; now epoch %d with workers %s",
                    router,
                    done,
                    channel["stalls_s"][-1],
                    channel["last_event"],
                    channel["epoch"],
                    list(channel["members"]),
                )
            self._failovers_seen[router] = done

    def _replace(self, st: SlotState) -> None:
        handle = self.spawn_worker(st.slot, self.map)
        st.handle, st.state, st.since = handle, "loading", time.monotonic()
        st.lifetime = handle.wait_stopped.remote().future()
        st.loading = handle.load.remote().future()
        st.replacements += 1
        self.counters.replacements_started += 1
        log.warning("starting a replacement for worker slot %d (attempt %d)", st.slot, st.replacements)

    def _replacement_failed(self, st: SlotState, why: str) -> None:
        self.counters.replacements_failed += 1
        self.policy.failed(st.slot, time.monotonic(), why)
        log.error("the replacement for worker slot %d failed: %s", st.slot, why)

    def _all_routers_have(self, slot: int) -> bool:
        try:
            stats = ray.get([r.channel_members.remote() for r in self.routers], timeout=self.ray_timeout_s)
        except (ray.exceptions.RayError, TimeoutError):
            return False
        return all(slot in members for members in stats)

    def _check_verdict(self) -> None:
        if self.failure is not None or not self.policy.given_up:
            return
        live = [s for s, st in self.slots.items() if st.state in ("serving", "joining")]
        lost = self.map.uncovered(live)
        if lost:
            self.failure = "; ".join(self.policy.given_up.values()) + (
                f"; experts {sorted(lost.items())[0][1]} of layer {sorted(lost)[0]} have no live copy"
            )
            log.critical("giving up: %s", self.failure)
            for router in self.routers:
                router.fail_cluster.remote(self.failure)

    # ---- rebalancing -------------------------------------------------------------------------------------
    def rebalance(self) -> RebalancePlan | None:
        """Recompute the map from the routed-token counts since the last rebalance and apply it without
        stopping; None when it would not improve the balance. Raises RuntimeError while the cluster is not at
        full strength (a worker being replaced: try again once it serves)."""
        with self._lock:
            if self.failure:
                raise RuntimeError(f"the cluster gave up: {self.failure}")
            busy = [st.slot for st in self.slots.values() if st.state != "serving"]
            if busy:
                raise RuntimeError(f"worker slots {busy} are being replaced; rebalance once they serve")
            loads = self._loads_since_last()
            plan = plan_rebalance(self.map, loads, self.extra, self.min_copies)
            if plan.after >= plan.before - 1e-9:
                log.info("rebalance skipped: max/mean load per worker %.3f would not improve", plan.before)
                return None
            workers = [st.handle for st in self.slots.values()]
        started = time.monotonic()
        ray.get([w.prepare_map.remote(plan.expert_map) for w in workers], timeout=self.load_timeout_s)
        ray.get([r.use_map.remote(plan.expert_map) for r in self.routers], timeout=self.ray_timeout_s)
        deadline = time.monotonic() + self.load_timeout_s
        while time.monotonic() < deadline:  # every router switches at its next step boundary
            generations = ray.get([r.map_generation.remote() for r in self.routers], timeout=self.ray_timeout_s)
            if all(g == plan.expert_map.generation for g in generations):
                break
            time.sleep(POLL_S)
        ray.get([w.retire_maps.remote(plan.expert_map.generation) for w in workers], timeout=self.ray_timeout_s)
        with self._lock:
            self.map = plan.expert_map
            self.counters.rebalances += 1
        log.warning(
            "rebalanced to map generation %d in %.2fs: max/mean load per worker %.2f -> %.2f, %d expert copies loaded",
            plan.expert_map.generation,
            time.monotonic() - started,
            plan.before,
            plan.after,
            plan.moved,
        )
        return plan

    def _periodic_rebalance(self) -> None:
        try:
            self.rebalance()
        except RuntimeError as e:
            log.info("periodic rebalance skipped: %s", e)

    def _loads_since_last(self) -> dict[int, list[int]]:
        stats = ray.get([r.stats.remote() for r in self.routers], timeout=self.ray_timeout_s)
        total: dict[int, list[int]] = {}
        for s in stats:
            for layer, counts in s["tokens_per_expert"].items():
                row = total.setdefault(layer, [0] * len(counts))
                total[layer] = [a + b for a, b in zip(row, counts)]
        last, self._loads_at_last_rebalance = self._loads_at_last_rebalance, total
        return {
            layer: [a - b for a, b in zip(counts, last.get(layer, [0] * len(counts)))]
            for layer, counts in total.items()
        }

    # ---- status ------------------------------------------------------------------------------------------
    def status(self) -> dict:
        with self._lock:
            return {
                "generation": self.map.generation,
                "failure": self.failure,
                "degraded": dict(self.policy.given_up),
                "slots": [
                    {"slot": st.slot, "state": st.state, "replacements": st.replacements, "last_error": st.last_error}
                    for st in sorted(self.slots.values(), key=lambda s: s.slot)
                ],
                "counters": vars(self.counters).copy(),
                "expert_map": self.map,
            }


def _death(lifetime: concurrent.futures.Future, slot: int) -> str:
    try:
        lifetime.result(timeout=0)
    except Exception as e:  # noqa: BLE001 - ActorDiedError and kin: the reason is in the message
        return error_summary(e)
    return f"worker slot {slot} shut down"
