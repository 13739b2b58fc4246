"""One expert worker as a router's channel sees it: start its loop for an epoch, ping it, fence it, kill it, and
read how its loop ended. The Ray implementation is the only one in production; tests give the channel fakes with
the same five methods, so the failover logic runs without Ray or real collectives."""

from __future__ import annotations

import concurrent.futures
from typing import Protocol

import ray

from cluster.actor_state import LoopEnd, LoopEndKind
from cluster.errors import error_summary
from cluster.process_group import GroupAddress


class WorkerLink(Protocol):
    slot: int

    def serve(self, router: int, address: GroupAddress, rank: int) -> concurrent.futures.Future: ...

    def outcome(self, loop: concurrent.futures.Future) -> LoopEnd:
        """How the (finished) loop call `loop` ended: the worker's own answer, or DEAD / FAILED from its error."""

    def ping(self, timeout_s: float) -> bool: ...

    def fence(self, router: int) -> None: ...

    def kill(self) -> None: ...


class RayWorkerLink:
    def __init__(self, slot: int, handle):
        self.slot, self.handle = slot, handle

    def serve(self, router: int, address: GroupAddress, rank: int) -> concurrent.futures.Future:
        return self.handle.serve.remote(router, address, rank).future()

    def outcome(self, loop: concurrent.futures.Future) -> LoopEnd:
        try:
            return loop.result(timeout=0)
        except ray.exceptions.ActorDiedError as e:
            return LoopEnd(LoopEndKind.DEAD, f"expert worker {self.slot} died: {error_summary(e)}")
        except ray.exceptions.RayActorError as e:
            return LoopEnd(LoopEndKind.DEAD, f"expert worker {self.slot} is unreachable: {error_summary(e)}")
        except Exception as e:  # noqa: BLE001 - the worker's own exception, passed on by name
            return LoopEnd(LoopEndKind.FAILED, f"expert worker {self.slot} failed: {error_summary(e)}")

    def ping(self, timeout_s: float) -> bool:
        try:
            ray.get(self.handle.ping.remote(), timeout=timeout_s)
            return True
        except (ray.exceptions.RayError, TimeoutError):
            return False

    def fence(self, router: int) -> None:
        try:
            self.handle.fence.remote(router)  # fire and forget: a dead worker needs no fencing
        except ray.exceptions.RayError:
            pass

    def kill(self) -> None:
        try:
            ray.kill(self.handle, no_restart=True)
        except (ray.exceptions.RayError, ValueError):
            pass
