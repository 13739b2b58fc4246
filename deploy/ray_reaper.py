"""The reaper of a private Ray: a small process, in a session of its own, that stops every process of that Ray
once the process that started it (the owner: `moecluster serve`, a benchmark, a test) is gone, however it went
(SIGKILL, the OOM killer, a crash, or a normal shutdown), and deletes the Ray's token directory.

Why: Ray 2.60 ties its GCS and raylet to the driver (PR_SET_PDEATHSIG), but not what the raylet starts: after a
SIGKILL of `moecluster serve` its dashboard agent and runtime-env agent were still running (and listening) a
minute later.

How a process of this Ray is known: the GCS, the raylet and whatever else ray.init starts carry a mark,
MOECLUSTER_PRIVATE_RAY=<a random id>, in their environment (the owner sets it only while ray.init runs, so nothing
else it starts carries it); the reaper follows every process born to a marked one, or to one of those (agents,
actors, their children), from the moment it first sees it, so one whose parent has died is still known. No name,
process group or session is used: Ray's actors move to process groups of their own, and the owner's group and
session may be a whole terminal job.

  reaper = Reaper.start(mark, token_dir)   # before ray.init; returns once the reaper watches the owner
  reaper.stop()                            # after ray.shutdown(): it sweeps what is left, then exits (bounded)

While the owner lives, the reaper looks for new processes every SCAN_S. It acts when the owner's pid exits (a
pidfd; where there is none, its own parent pid changing) or when its stdin (a pipe only the owner holds) reaches
end of file: it SIGKILLs every process of the Ray, again until none is left (at most SWEEP_S), deletes the token
directory and exits. This file runs as a script and
imports nothing from the project (run isolated, `python -I`), so it starts in a fraction of a second.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

MARK_ENV = "MOECLUSTER_PRIVATE_RAY"
SCAN_S = 0.5  # how often the reaper looks for new processes of the Ray while the owner lives
SWEEP_S = 10.0  # how long the sweep keeps killing processes that carry the mark
READY_TIMEOUT_S = 30.0  # the reaper's start-up (a Python interpreter on a loaded machine)


class ReaperError(RuntimeError):
    """The reaper could not be started (the private Ray is then not started either)."""


class Reaper:
    """The owner's handle on its reaper process."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    @classmethod
    def start(cls, mark: str, token_dir: Path) -> Reaper:
        """Start the reaper for this process; returns once it watches (ReaperError if not within READY_TIMEOUT_S)."""
        cmd = [sys.executable, "-I", "-u", str(Path(__file__).resolve()), str(os.getpid()), mark, str(token_dir)]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True, env=_without_mark()
        )
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"watching":
            proc.kill()
            proc.wait(timeout=10)
            raise ReaperError(f"the private Ray's reaper did not start within {READY_TIMEOUT_S:.0f}s: {line!r}")
        return cls(proc)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = SWEEP_S + 5.0) -> bool:
        """Let the reaper sweep what is left of the Ray and exit; True if it did within `timeout_s`."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return False
        finally:
            self.proc.stdout.close()
        return self.proc.returncode == 0


def _without_mark() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != MARK_ENV}


# ---- the reaper process ----------------------------------------------------------------------------------------


class Tree:
    """The processes of one private Ray as seen so far, by (pid, start time): those that carry the mark (the GCS,
    the raylet and what ray.init starts beside them) and every process born to one of them. A process is judged
    once, when first seen, so one that outlives its parent (reparented to init) is still known. The mark alone is
    not enough: Ray's process titles (setproctitle) overwrite the environment that /proc shows for the agents."""

    def __init__(self, mark: str):
        self.needle = f"{MARK_ENV}={mark}".encode()
        self.seen: dict[int, int] = {}  # pid -> start time, every process judged (to judge each once)
        self.members: dict[int, int] = {}  # pid -> start time, the private Ray's

    def scan(self) -> None:
        """Judge the processes that appeared since the last scan (parents before children)."""
        current = {int(e.name): _stat(int(e.name)) for e in Path("/proc").glob("[0-9]*")}
        current = {pid: stat for pid, stat in current.items() if stat is not None}
        pending = {pid: stat[0] for pid, stat in current.items() if self.seen.get(pid) != stat[1]}
        self.seen = {pid: stat[1] for pid, stat in current.items()}
        marked = {pid for pid in pending if self._marked(pid)}
        parents = {pid for pid, start in self.members.items() if pid in current and current[pid][1] == start}
        while joined := [pid for pid, ppid in pending.items() if ppid in parents or pid in marked]:
            for pid in joined:
                self.members[pid] = current[pid][1]
                parents.add(pid)
                del pending[pid]

    def alive(self) -> list[int]:
        """Members still running (neither gone, reused for another process, nor a zombie)."""
        alive = []
        for pid, start in list(self.members.items()):
            stat = _stat(pid)
            if stat is None or stat[1] != start or stat[2] == "Z":
                del self.members[pid]
            else:
                alive.append(pid)
        return alive

    def _marked(self, pid: int) -> bool:
        try:
            return self.needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone, or another user's
            return False


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time in clock ticks, state) of a live process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19]), fields[0]


def sweep(tree: Tree, sweep_s: float = SWEEP_S) -> tuple[int, list[int]]:
    """SIGKILL the Ray's processes, again (with what they start meanwhile) until none is left or `sweep_s` has
    passed: (how many were killed, the pids still there)."""
    killed, deadline = set(), time.monotonic() + sweep_s
    tree.scan()
    while (left := tree.alive()) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
        tree.scan()
    return len(killed), left


def _wait_for_owner(owner: int, tree: Tree) -> str:
    """Follow the Ray's processes until the owner exits or closes our stdin; says which."""
    try:
        watch = [sys.stdin.fileno(), os.pidfd_open(owner)]
    except (AttributeError, OSError):  # no pidfd (old kernel): its death shows as a new parent
        watch = [sys.stdin.fileno()]
    while True:
        ready, _, _ = select.select(watch, [], [], SCAN_S)
        tree.scan()
        if len(watch) > 1 and watch[1] in ready:
            return f"the owner (pid {owner}) exited"
        if watch[0] in ready and not os.read(watch[0], 4096):  # its end closes as it exits, too: which was it?
            exited = len(watch) > 1 and select.select(watch[1:], [], [], 0.5)[0]
            return f"the owner (pid {owner}) " + ("exited" if exited else "stopped its Ray")
        if os.getppid() != owner:
            return f"the owner (pid {owner}) exited"


def _say(text: str) -> None:
    try:
        print(f"moecluster ray reaper: {text}", file=sys.stderr, flush=True)
    except OSError:  # the owner's stderr may be gone with it
        pass


def main(argv: list[str]) -> int:
    owner, mark, token_dir = int(argv[0]), argv[1], argv[2]
    for sig in (signal.SIGINT, signal.SIGHUP):  # a terminal's Ctrl-C or hang-up is the owner's to handle
        signal.signal(sig, signal.SIG_IGN)
    if os.getppid() != owner:
        return 1  # the owner died before we could watch it: it never started a Ray
    print("watching", flush=True)
    tree = Tree(mark)
    why = _wait_for_owner(owner, tree)
    killed, left = sweep(tree)
    shutil.rmtree(token_dir, ignore_errors=True)
    if killed or left:
        _say(f"{why}; stopped {killed} processes of its private Ray" + (f", {left} still there" if left else ""))
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
