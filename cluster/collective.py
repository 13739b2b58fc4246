"""Posting and waiting on one channel's collectives, and the one error a broken channel raises.

A failed collective (a peer died, its group was closed, aborted or timed out) raises `CollectiveError`, which the
router's channel recovers from; any other exception is a bug and propagates.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass


class CollectiveError(RuntimeError):
    """A collective of the channel failed: a peer died, its sockets closed, or the group timed out or was aborted."""


@dataclass
class Pending:
    """One exchange in flight on the router: its collectives, and what turns their results into the expert
    outputs [R, D] in the order the rows were dispatched (called once they completed)."""

    works: list
    finish: Callable[[], object]
    timeout: datetime.timedelta | None = None  # for works that carry none of their own (point-to-point)


def post(start: Callable[[], object]):
    """Start a collective; a broken group raises at once, as CollectiveError."""
    try:
        return start()
    except RuntimeError as e:
        raise CollectiveError(_first_line(e)) from e


def wait(work, timeout: datetime.timedelta | None = None) -> None:
    try:
        work.wait() if timeout is None else work.wait(timeout)
    except RuntimeError as e:
        raise CollectiveError(_first_line(e)) from e


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
