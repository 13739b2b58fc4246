"""Shows weight loading while the actors read their tensors: one line per actor (bytes and tensors), redrawn
in place on a terminal, printed once at the end otherwise. Waits are bounded by the start-up timeout."""

from __future__ import annotations

import sys
import time

import ray

from cluster.load_progress import LoadProgress
from deploy.errors import ClusterStartError

POLL_S = 0.25


def load_with_progress(actors: list, timeout_s: float, stream=sys.stderr, show: bool = True) -> None:
    """Call `load()` on every actor and wait for all, drawing their `load_progress()` meanwhile."""
    pending = {actor.load.remote(): actor for actor in actors}
    deadline = time.monotonic() + timeout_s
    tty = show and hasattr(stream, "isatty") and stream.isatty()
    drawn = 0
    while pending:
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
        for ref in done:
            ray.get(ref)  # raises the actor's error (missing tensor, bad shape, ...) at once
            pending.pop(ref)
        if time.monotonic() > deadline:
            raise ClusterStartError(f"weights did not load within {timeout_s:.0f}s (startup timeout)")
        if tty:
            drawn = _draw(_poll(actors), stream, drawn)
    if show:
        lines = _poll(actors)
        if tty:
            _draw(lines, stream, drawn)
        else:
            total = sum(p.bytes_total for p in lines)
            stream.write(f"loaded weights: {len(lines)} actors, {total / 1e6:.1f} MB\n")
        stream.flush()


def _poll(actors: list) -> list[LoadProgress]:
    return ray.get([a.load_progress.remote() for a in actors], timeout=30)


def _draw(progress: list[LoadProgress], stream, previous_lines: int) -> int:
    if previous_lines:
        stream.write(f"\x1b[{previous_lines}F")  # back to the first line drawn last time
    for p in progress:
        stream.write(f"\x1b[2Kloading {_bar(p)} {p.line()}\n")
    stream.flush()
    return len(progress)


def _bar(p: LoadProgress, width: int = 24) -> str:
    filled = width if p.done or not p.bytes_total else int(width * p.bytes_done / p.bytes_total)
    return "[" + "#" * filled + "." * (width - filled) + "]"
