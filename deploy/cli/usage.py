"""The one error type every subcommand raises for a bad command-line value."""

from __future__ import annotations

from contextlib import contextmanager

from cluster.settings import SettingError


class UsageError(ValueError):
    """A bad command-line value; the message names the flag. `main` prints it as `error: ...`, exit status 2."""


@contextmanager
def as_flags(flags: dict[str, str]):
    """Within: a SettingError about key k becomes a UsageError about the flag `flags[k]` (settings built from
    command-line values name the flag the person typed)."""
    try:
        yield
    except SettingError as e:
        flag = flags.get(e.key.split(".")[0])
        raise UsageError(f"{flag}: {e.problem}" if flag else str(e)) from None
