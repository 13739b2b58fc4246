"""When to keep replacing dead expert workers, and when to give up. Bookkeeping only (no Ray, no torch): the
supervisor reports each replacement's start and outcome and asks what to do.

A replacement fails if its actor dies or errors before it serves (while loading or joining). After
`max_failures` failures within `window_s` the policy gives up on that slot: the cluster then keeps serving if
every expert still has a live copy (it runs degraded, and says so in status and health), and otherwise its
requests end with UNAVAILABLE naming why and liveness turns NOT_SERVING, so the orchestrator restarts the pod.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class ReplacementPolicy:
    max_failures: int = 3
    window_s: float = 300.0
    _failures: dict[int, deque] = field(default_factory=dict)  # slot -> failure times within the window
    given_up: dict[int, str] = field(default_factory=dict)  # slot -> why

    def failed(self, slot: int, now: float, why: str) -> None:
        times = self._failures.setdefault(slot, deque())
        times.append(now)
        while times and now - times[0] > self.window_s:
            times.popleft()
        if len(times) >= self.max_failures:
            self.given_up[slot] = (
                f"worker slot {slot}: {len(times)} replacements failed within {self.window_s:.0f}s (last: {why})"
            )

    def succeeded(self, slot: int) -> None:
        self._failures.pop(slot, None)
        self.given_up.pop(slot, None)

    def may_replace(self, slot: int) -> bool:
        return slot not in self.given_up
