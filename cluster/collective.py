"""Posting and waiting on one channel's collectives, and the one error a broken channel raises.

A failed collective (a peer died, its group was closed, aborted or timed out) raises `CollectiveError`, which the
router's channel recovers from; any other exception is a bug and propagates.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cluster.errors import CollectiveError


@dataclass
class Pending:
    """One exchange in flight on the router: its collectives, and what turns their results into the expert
    outputs [R, D] in the order the rows were dispatched (called once they completed)."""

    works: list
    finish: Callable[[], object]
    timeout: datetime.timedelta | None = None  # for works that carry none of their own (point-to-point)
    sends: list = field(default_factory=list)  # point-to-point sends, waited first, each within SEND_WAIT


# A gloo send to a peer that was just SIGKILLed can neither complete nor fail until the group's timeout (seen on
# torch 2.13: the write is accepted, the completion never comes), and neither shutdown() nor abort() wakes it. A
# send to a live peer completes as soon as its bytes are in the socket, so the router bounds each of its sends
# with this: a dead member costs a failover at most this long rather than the collective timeout, and a false
# alarm costs only a regroup with the same members and a replayed step.
SEND_WAIT = datetime.timedelta(seconds=5)


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


def send_to_members(group, tensor, world: int) -> tuple[list, CollectiveError | None]:
    """Post one send of `tensor` to each member (ranks 1..world-1), each its own message, so that one dead member
    keeps it from no other: the works posted, and the first failure to post (that member is gone)."""
    works, failure = [], None
    for rank in range(1, world):
        try:
            works.append(post(lambda rank=rank: group.send([tensor], rank, 0)))
        except CollectiveError as e:
            failure = failure or e
    return works, failure


def wait_best_effort(works: Iterable, within: datetime.timedelta) -> None:
    """Wait for `works` (fence messages) until one shared deadline, ignoring failures: a message to a dead peer
    never completes, and must cost the failover no more than `within` in all."""
    deadline = time.monotonic() + within.total_seconds()
    for work in works:
        left = max(deadline - time.monotonic(), 0.001)
        try:
            wait(work, datetime.timedelta(seconds=left))
        except CollectiveError:
            pass


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
