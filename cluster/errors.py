"""One line from an error that may have crossed Ray: Ray wraps an actor's exception (`.cause`) in a message
carrying the remote traceback and advice; people and logs need the innermost message only."""

from __future__ import annotations

RAY_ADVICE = " Some common causes"  # Ray appends a paragraph of generic advice to actor-death messages


def error_summary(error: BaseException, limit: int = 300) -> str:
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and cause is not error:
        return error_summary(cause, limit)
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    return text.split(RAY_ADVICE)[0][:limit]
