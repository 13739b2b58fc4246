"""When to keep replacing dead actors (expert workers, routers), and when to give up. Bookkeeping only (no Ray, no
torch): the supervisor reports each replacement's outcome per place (a worker slot, a router) and asks what to do.

A replacement fails if its actor dies or errors before it serves (while loading, joining or connecting). After
`max_failures` failures within `window_s` the policy gives up on that place: the cluster then keeps serving if
every expert still has a live copy and a router is left (it runs degraded, and says so in status and health), and
otherwise its requests end with UNAVAILABLE naming why and liveness turns NOT_SERVING, so the orchestrator
restarts the pod.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from cluster.actor_state import ActorKind


@dataclass
class ReplacementPolicy:
    max_failures: int = 3
    window_s: float = 300.0
    _failures: dict[Hashable, deque] = field(default_factory=dict)  # place -> failure times within the window
    given_up: dict[Hashable, str] = field(default_factory=dict)  # place -> why

    def failed(self, place: Hashable, now: float, why: str) -> None:
        """`place`: a worker slot (an int, or (ActorKind.WORKER, slot)), or (kind, index) of a router or encoder."""
        times = self._failures.setdefault(place, deque())
        times.append(now)
        while times and now - times[0] > self.window_s:
            times.popleft()
        if len(times) >= self.max_failures:
            self.given_up[place] = (
                f"{_name(place)}: {len(times)} replacements failed within {self.window_s:.0f}s (last: {why})"
            )

    def succeeded(self, place: Hashable) -> None:
        self._failures.pop(place, None)
        self.given_up.pop(place, None)

    def may_replace(self, place: Hashable) -> bool:
        return place not in self.given_up


def _name(place: Hashable) -> str:
    if isinstance(place, tuple):
        kind, index = place
        return f"worker slot {index}" if kind is ActorKind.WORKER else f"{kind.value} {index}"
    return f"worker slot {place}"
