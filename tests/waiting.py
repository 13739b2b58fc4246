"""Polling a condition with a bound: the tests' one way to wait for something a cluster or a server does."""

from __future__ import annotations

import time


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition", interval_s: float = 0.1) -> None:
    """Return once `predicate()` is true, checking every `interval_s`; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)
