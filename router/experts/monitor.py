"""Watches a router's channel from a thread of its own: the members' loop calls, and the step in flight.

- A member's loop call ending while its epoch is current means the worker died or its loop raised: set
  `lost_member` (the engine thread recovers at the next step boundary, or at once if a step is blocked), kill a
  worker whose loop raised (so its sockets close), and on NCCL abort the data group now, because a collective
  with a dead peer would block until its timeout.
- A step making no progress for `hang_timeout_s` means a member stopped answering without dying (SIGSTOP, a
  wedged driver): ping every member and kill the ones that do not answer within `ping_timeout_s`; their sockets
  reset and the blocked collective fails, as for a death.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Protocol

from cluster.actor_state import LoopEnd, LoopEndKind
from router.experts.liveness import kill_silent
from router.experts.settings import ChannelSettings
from router.experts.worker_link import WorkerLink

log = logging.getLogger(__name__)


class Watched(Protocol):
    """What the monitor reads of the channel it watches (router/experts/channel.py's ExpertChannel)."""

    router: int
    backend: str
    settings: ChannelSettings
    links: dict[int, WorkerLink]
    transport: object  # the current epoch's transport (None before the first), for `groups.abort()`
    step_started: float | None  # when the step in flight started; None between steps

    @property
    def members(self) -> tuple[int, ...]:
        """The worker slots of the current epoch."""


class ChannelMonitor:
    def __init__(self, channel: Watched):
        self.channel = channel
        self.lost_member = threading.Event()
        self._loops: dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._probed_step: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"channel-monitor-{channel.router}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.watch({})

    def watch(self, loops: dict[int, concurrent.futures.Future]) -> None:
        """The loop calls of the current epoch ({} while the channel changes epochs on purpose)."""
        with self._lock:
            self._loops = dict(loops)

    def _run(self) -> None:
        while not self._stop.wait(self.channel.settings.poll_s):
            try:
                self._check_loops()
                self._check_stall()
            except Exception:  # a bug here must not end the watch (logged with its traceback)
                log.exception("router %d: channel monitor", self.channel.router)

    def _check_loops(self) -> None:
        with self._lock:
            ended = {slot: loop for slot, loop in self._loops.items() if loop.done()}
            for slot in ended:
                del self._loops[slot]
        for slot, loop in ended.items():
            link = self.channel.links.get(slot)
            if link is None:
                continue
            end = link.outcome(loop)
            if end.alive:
                reason = f"expert worker {slot} left the group unexpectedly ({end.describe()})"
                end = LoopEnd(LoopEndKind.DEAD, reason)
            log.error("router %d: %s", self.channel.router, end.describe())
            if end.kind is LoopEndKind.FAILED:
                link.kill()
            self._unblock()

    def _check_stall(self) -> None:
        started = self.channel.step_started
        if started is None or time.monotonic() - started < self.channel.settings.hang_timeout_s:
            return
        if self._probed_step == started:
            return  # this step was probed already
        self._probed_step = started
        links = [self.channel.links[s] for s in self.channel.members if s in self.channel.links]
        log.warning(
            "router %d: a step has made no progress for %.1fs; pinging workers %s",
            self.channel.router,
            time.monotonic() - started,
            [link.slot for link in links],
        )
        if kill_silent(links, self.channel.settings.ping_timeout_s, self.channel.router, "stopped answering"):
            self._unblock()

    def _unblock(self) -> None:
        self.lost_member.set()
        transport = self.channel.transport
        if transport is not None and self.channel.backend == "nccl":
            transport.groups.abort()  # NCCL would wait for its timeout; gloo fails on the peer's closed sockets
