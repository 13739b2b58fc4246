"""The routers the gateway spreads new requests over, with their readiness and load as last polled.

A new request goes to the ready router with the least work: its running and waiting sequences as last polled
plus the streams this gateway has open on it, then its KV usage. With cache-affinity routing (`affinity`, the
default while the routers cache prefixes) it goes instead to the router holding the longest run of its prompt's
leading blocks, unless that router is far busier than the least loaded (router/gateway/affinity.py).

A request stays on its router; when that router dies the stream relay takes another (or waits, bounded, for one
to be ready: with one router, for its replacement). The handles come from the cluster view, so a restarted router
is picked up at the next poll.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from router.gateway.affinity import Affinity
from router.gateway.cluster_view import ClusterView
from router.request.messages import EngineStats

WAIT_POLL_S = 0.05


@dataclass
class RouterEntry:
    index: int
    handle: object
    ready: bool = False
    reason: str = "the router is starting"
    engine: EngineStats | None = None  # as of the last poll
    assigned: int = 0  # open streams this gateway has on it

    @property
    def load(self) -> tuple[int, float]:
        engine = self.engine
        queued = (engine.running + engine.waiting) if engine else 0
        usage = engine.kv_blocks_used / engine.kv_blocks_total if engine and engine.kv_blocks_total else 0.0
        return queued + self.assigned, usage

    @property
    def streams(self) -> int:
        """Sequences on it, counted once: as polled, or the streams this gateway has open on it if more (a poll
        lags the streams just sent)."""
        engine = self.engine
        return max((engine.running + engine.waiting) if engine else 0, self.assigned)


class RouterPool:
    def __init__(self, view: ClusterView, affinity: Affinity | None = None):
        """`affinity`: route by cache affinity; None: least loaded only."""
        self.view, self.affinity = view, affinity
        self.entries: dict[int, RouterEntry] = {}
        self.refresh_handles()

    def refresh_handles(self) -> None:
        for index, handle in enumerate(self.view.routers):
            entry = self.entries.get(index)
            if entry is None:
                self.entries[index] = RouterEntry(index, handle)
            elif entry.handle is not handle:  # a replacement: not ready until it says so
                entry.handle, entry.ready, entry.reason, entry.engine = handle, False, "the router is restarting", None
                if self.affinity is not None:
                    self.affinity.forget(index)  # the replacement's cache starts empty

    @property
    def ready(self) -> bool:
        return any(e.ready for e in self.entries.values())

    @property
    def reason(self) -> str:
        """Why no router is ready (the reasons of all of them)."""
        return "; ".join(f"router {e.index}: {e.reason}" for e in self.entries.values() if not e.ready)

    @property
    def waiting(self) -> int:
        return sum(e.engine.waiting for e in self.entries.values() if e.engine)

    def choose(self, avoid: RouterEntry | None = None, hashes: Sequence[bytes] = ()) -> RouterEntry | None:
        """A ready router (another than `avoid` if there is one): by cache affinity for a prompt with these leading
        block hashes, else the least loaded."""
        ready = [e for e in self.entries.values() if e.ready]
        others = [e for e in ready if e is not avoid]
        candidates = others or ready
        if not candidates:
            return None
        if self.affinity is not None and hashes:
            return self.affinity.pick(candidates, lambda e: e.index, lambda e: (e.streams, *e.load), hashes)
        return min(candidates, key=lambda e: (*e.load, e.index))

    def sent(self, entry: RouterEntry, hashes: Sequence[bytes]) -> None:
        """`entry` was sent (or computed) blocks with these hashes: a later prompt that starts with them goes there."""
        if self.affinity is not None and hashes:
            self.affinity.record(hashes, entry.index)

    async def wait_for_one(
        self, deadline: float, avoid: RouterEntry | None = None, hashes: Sequence[bytes] = ()
    ) -> RouterEntry | None:
        """A ready router, waiting until `deadline` (time.monotonic) for one; None if none became ready."""
        while True:
            entry = self.choose(avoid, hashes)
            if entry is not None or time.monotonic() >= deadline:
                return entry
            await asyncio.sleep(WAIT_POLL_S)

    def mark_down(self, entry: RouterEntry, reason: str) -> None:
        """The relay saw it fail: stop sending it requests until a poll finds it (or its replacement) ready."""
        entry.ready, entry.reason = False, reason
