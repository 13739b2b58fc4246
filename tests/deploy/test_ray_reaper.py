"""The private Ray's reaper (deploy/ray_reaper.py) on plain processes standing in for Ray's: a "daemon" that carries
the mark and a child of it that does not (as the raylet's agents, whose process titles overwrite the environment
/proc shows). When the owner is SIGKILLed, or stops its reaper, both go and the token directory is deleted; a
process the owner started without the mark is left alone; bytes on the reaper's pipe do not set it off."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deploy.ray_reaper import MARK_ENV, Reaper

ROOT = str(Path(__file__).resolve().parents[2])
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
# the daemon: starts a child with an empty environment, prints "child <pid>", sleeps
DAEMON = (
    "import subprocess, sys, time\n"
    f"child = subprocess.Popen({SLEEPER!r}, env={{}})\n"
    "print('child', child.pid, flush=True)\n"
    "time.sleep(600)\n"
)
# the owner: starts its reaper, the daemon (marked) and a plain sleeper (unmarked), prints their pids, sleeps
OWNER = (
    "import os, subprocess, sys, time\n"
    f"sys.path.insert(0, {ROOT!r})\n"
    "from pathlib import Path\n"
    "from deploy.ray_reaper import MARK_ENV, Reaper\n"
    "reaper = Reaper.start(sys.argv[1], Path(sys.argv[2]))\n"
    f"daemon = subprocess.Popen([sys.executable, '-c', {DAEMON!r}], env={{**os.environ, MARK_ENV: sys.argv[1]}})\n"
    f"plain = subprocess.Popen({SLEEPER!r})\n"
    "print('pids', reaper.proc.pid, daemon.pid, plain.pid, flush=True)\n"
    "time.sleep(600)\n"
)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_sigkilled_owner_takes_its_marked_processes_and_their_children_along(tmp_path):
    token_dir = tmp_path / "token"
    token_dir.mkdir()
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, "test-mark-1", str(token_dir)], stdout=subprocess.PIPE, text=True
    )
    lines = dict(owner.stdout.readline().split(" ", 1) for _ in range(2))  # "pids ..." and the daemon's "child ..."
    reaper, daemon, plain = map(int, lines["pids"].split())
    child = int(lines["child"])
    try:
        assert all(alive(p) for p in (reaper, daemon, child, plain))
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=10)
        assert wait_gone([daemon, child, reaper]) == []
        assert not token_dir.exists()
        assert alive(plain)  # not the Ray's: the owner started it without the mark
    finally:
        kill_all([daemon, child, plain, reaper])


def test_stop_sweeps_what_is_left_and_garbage_on_the_pipe_changes_nothing():
    token_dir = Path(tempfile.mkdtemp(prefix="reaper-test-"))
    reaper = Reaper.start("test-mark-2", token_dir)
    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON], env={**os.environ, MARK_ENV: "test-mark-2"}, stdout=subprocess.PIPE, text=True
    )
    child = int(daemon.stdout.readline().split()[1])
    try:
        reaper.proc.stdin.write(b"not a command\n" * 100)
        reaper.proc.stdin.flush()
        time.sleep(1.0)  # two of its scans
        assert reaper.alive and alive(daemon.pid) and alive(child)
        assert reaper.stop() is True
        assert wait_gone([daemon.pid, child], timeout_s=1.0) == []
        assert not token_dir.exists()
    finally:
        kill_all([daemon.pid, child])
        daemon.wait(timeout=10)
