"""The ping-and-kill the channel and its monitor share: every link pinged at once, the silent ones killed; and the
monitor's independence from the channel module (the import cycle it used to close)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from router.experts.liveness import kill_silent

TIMEOUT_S = 0.3


class Link:
    """A worker that answers a ping at once, or is hung (the ping waits out its timeout)."""

    def __init__(self, slot: int, hung: bool):
        self.slot, self.hung, self.killed = slot, hung, False
        self.pinged = threading.Event()

    def ping(self, timeout_s: float) -> bool:
        self.pinged.set()
        if self.hung:
            time.sleep(timeout_s)
            return False
        return True

    def kill(self) -> None:
        self.killed = True


def test_the_silent_are_killed_and_returned_and_the_others_left_alone():
    links = [Link(0, hung=False), Link(1, hung=True), Link(2, hung=False), Link(3, hung=True)]
    killed = kill_silent(links, TIMEOUT_S, router=0, why="stopped answering")
    assert [link.slot for link in killed] == [1, 3]
    assert [link.killed for link in links] == [False, True, False, True]
    assert all(link.pinged.is_set() for link in links)


def test_the_pings_run_at_once_so_many_hung_workers_cost_one_timeout():
    links = [Link(slot, hung=True) for slot in range(6)]
    started = time.monotonic()
    assert len(kill_silent(links, TIMEOUT_S, router=0, why="is gone")) == 6
    assert time.monotonic() - started < 3 * TIMEOUT_S  # one after the other would take 6 timeouts


def test_no_links_no_pings():
    assert kill_silent([], TIMEOUT_S, router=0, why="is gone") == []


def test_the_monitor_does_not_import_the_channel():
    code = "import sys, router.experts.monitor; assert 'router.experts.channel' not in sys.modules, sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
