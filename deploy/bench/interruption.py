"""Whether a kill "under load" hit the load. A fixed delay before the kill measures nothing on a fast machine (the
streams are over before it), so the benchmarks and fault tests that kill something while streams run
  * kill once every stream has produced a token and still has tokens to produce (`ready_to_kill`, waited for by
    `kill_when_ready` / `kill_when_ready_async`), and
  * check afterwards, from the token arrival times they recorded, that every stream received tokens both before
    and after the kill (`interrupted`); a row whose kill missed says AFTER_LOAD instead of a stall figure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

AFTER_LOAD = "kill landed after the load"
POLL_S = 0.005  # how often kill_when_ready looks at the streams


@dataclass
class StreamLog:
    """One request's progress as its client sees it: when each chunk of tokens arrived (time.perf_counter())."""

    max_tokens: int
    times: list[float] = field(default_factory=list)
    tokens: int = 0
    done: bool = False

    def add(self, tokens: int, at: float | None = None) -> None:
        if tokens:
            self.tokens += tokens
            self.times.append(time.perf_counter() if at is None else at)

    @property
    def left(self) -> int:
        return 0 if self.done else self.max_tokens - self.tokens


def margin(max_tokens: int) -> int:
    """Tokens a stream must still have to produce at the kill: an eighth of its request (at least 2), so that tokens
    already on their way when the kill lands cannot pass for tokens produced after it."""
    return max(2, max_tokens // 8)


def ready_to_kill(logs: Sequence[StreamLog]) -> bool:
    """Every stream has produced at least one token and has `margin` tokens left."""
    return bool(logs) and all(log.tokens >= 1 and log.left >= margin(log.max_tokens) for log in logs)


def too_late(logs: Sequence[StreamLog]) -> bool:
    """A stream has ended or is within its margin: `ready_to_kill` can no longer become true for this load."""
    return any(log.done or (log.tokens >= 1 and log.left < margin(log.max_tokens)) for log in logs)


def interrupted(times: Sequence[Sequence[float]], kill_at: float, until: float | None = None) -> bool:
    """True when every stream (its token arrival times) received tokens before `kill_at` and after it (up to
    `until`, when given: e.g. the next kill's time)."""
    return bool(times) and all(
        any(t < kill_at for t in stream) and any(kill_at < t and (until is None or t <= until) for t in stream)
        for stream in times
    )


def kill_when_ready(
    ready: Callable[[], bool], late: Callable[[], bool], kill: Callable[[], None], timeout_s: float = 120.0
) -> float:
    """Call `kill()` once `ready()` (or at once when `late()`: the load cannot get there, and the check afterwards
    will say so); returns when it killed (perf_counter). Polls every POLL_S; TimeoutError if neither within
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not _due(ready, late, deadline, timeout_s):
        time.sleep(POLL_S)
    return _kill(kill)


async def kill_when_ready_async(
    ready: Callable[[], bool], late: Callable[[], bool], kill: Callable[[], None], timeout_s: float = 120.0
) -> float:
    """kill_when_ready for streams read on this event loop (it yields to them while it waits)."""
    deadline = time.monotonic() + timeout_s
    while not _due(ready, late, deadline, timeout_s):
        await asyncio.sleep(POLL_S)
    return _kill(kill)


def _due(ready: Callable[[], bool], late: Callable[[], bool], deadline: float, timeout_s: float) -> bool:
    if ready() or late():
        return True
    if time.monotonic() > deadline:
        raise TimeoutError(f"the streams were not all generating within {timeout_s:.0f}s: nothing was killed")
    return False


def _kill(kill: Callable[[], None]) -> float:
    at = time.perf_counter()
    kill()
    return at
