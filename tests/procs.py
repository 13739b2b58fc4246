"""Processes a test started, found by ancestry (never by name alone) or asked of a Ray actor, and a check that no
Ray is left behind."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path


def _cmdline(pid: int | str) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent(pid: int | str) -> int | None:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a live process has used so far; 0.0 once it is gone."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> list[int]:
    """Every live process below `root` (children, grandchildren, ...)."""
    parents = {int(p.name): _parent(p.name) for p in Path("/proc").glob("[0-9]*")}
    found, frontier = [], {root}
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = set(children)
    return found


def descendants_running(root: int, pattern: str) -> list[int]:
    """Descendants of `root` whose command line contains `pattern` (e.g. "ray::ExpertWorker")."""
    return [pid for pid in descendants(root) if pattern in _cmdline(pid)]


def ray_processes() -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        text = _cmdline(cmdline.parent.name)
        if re.search(r"ray::|raylet|gcs_server", text):
            found.append(f"{cmdline.parent.name}: {text[:80]}")
    return found


def ray_gone(timeout_s: float = 20.0) -> bool:
    """True once no Ray process is left; waits, since daemons take a moment to exit after a shutdown."""
    deadline = time.monotonic() + timeout_s
    while ray_processes():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def pid_of(actor) -> int:
    """The process id of a Ray actor that answers `ping()` (an expert worker, a vision encoder)."""
    import ray

    return ray.get(actor.ping.remote(), timeout=30).pid
