"""The cluster layer's errors (a collective failed; the expert side gave up), and one line from an error that may
have crossed Ray: Ray wraps an actor's exception (`.cause`) in a message carrying the remote traceback and advice;
people and logs need the innermost message only."""

from __future__ import annotations


class CollectiveError(Exception):
    """A collective of the channel failed: a peer died, its sockets closed, or the group timed out or was aborted."""


class ClusterFailure(Exception):
    """The expert side cannot serve and will not recover (the supervisor gave up); the message says why."""


class RebalanceRefused(Exception):
    """The supervisor will not rebalance now (no workers, the cluster gave up, or actors are being replaced); the
    message says why and when to try again. Crosses Ray from the supervisor to the gateway's Rebalance RPC."""


RAY_ADVICE = " Some common causes"  # Ray appends a paragraph of generic advice to actor-death messages


def error_summary(error: BaseException, limit: int = 300) -> str:
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and cause is not error:
        return error_summary(cause, limit)
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    return text.split(RAY_ADVICE)[0][:limit]
