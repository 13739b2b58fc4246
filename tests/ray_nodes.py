"""Ray nodes a test starts itself (`ray start --block`, each in a process group of its own) and stops by killing
that group, so a test never stops anyone else's Ray (`ray stop` would stop every Ray on the machine)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


class RayNode:
    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout_s: float = 120.0):
        """`args` for `ray start` (e.g. "--head", "--port=6379" or "--address=..."); returns once it runs."""
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.output: list[str] = []
        started = threading.Event()
        threading.Thread(target=self._read, args=(started,), daemon=True).start()
        if not started.wait(timeout_s):
            self.stop()
            raise RuntimeError("ray start did not come up:\n" + "".join(self.output[-40:]))

    def _read(self, started: threading.Event) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            if "Ray runtime started" in line:
                started.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM to the node's process group, then SIGKILL to what is left of it."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                self.proc.poll()
                time.sleep(0.2)
        self.proc.wait(timeout=10)


def _group_alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
