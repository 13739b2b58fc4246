"""Keeps a command's standard output for its own results. Ray's driver prints the raylet's error reports (such as
"A worker died or was killed ...", which a failover makes routine) on sys.stdout whatever `log_to_driver` says; a
command whose stdout is read by programs (`generate --json`, the `serve` line) sends everything else to stderr
while Ray runs."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO


@contextlib.contextmanager
def results_only() -> Iterator[TextIO]:
    """Within: sys.stdout is stderr; write results to the stream this yields (the real stdout)."""
    real = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        yield real
