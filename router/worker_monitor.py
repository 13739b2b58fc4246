"""Watches the expert workers' persistent-loop calls: the first one that ends unexpectedly (actor death, an
exception) becomes the cluster's failure, named by worker, within about a second."""

from __future__ import annotations

import threading
from collections.abc import Callable

import ray

from cluster.errors import error_summary


class WorkerMonitor:
    def __init__(self, on_failure: Callable[[str], None], poll_s: float = 0.5):
        self.on_failure, self.poll_s = on_failure, poll_s
        self._failure: str | None = None
        self._stopping = threading.Event()
        self._refs: dict = {}
        self._thread: threading.Thread | None = None

    def failure(self) -> str | None:
        return self._failure

    def watch(self, loop_refs: dict[int, ray.ObjectRef]) -> None:
        self._refs = {ref: worker for worker, ref in loop_refs.items()}
        self._thread = threading.Thread(target=self._run, name="worker-monitor", daemon=True)
        self._thread.start()

    def stopping(self) -> None:
        self._stopping.set()

    def wait_all(self, timeout_s: float) -> None:
        if self._refs:
            ray.wait(list(self._refs), num_returns=len(self._refs), timeout=timeout_s)

    def _run(self) -> None:
        pending = list(self._refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=self.poll_s)
            for ref in ready:
                reason = self._reason(self._refs[ref], ref)
                if reason and self._failure is None:
                    self._failure = reason
                    self.on_failure(reason)

    def _reason(self, worker: int, ref) -> str | None:
        try:
            ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the worker's own exception, passed on by name
            if self._stopping.is_set():
                return None
            if isinstance(e, ray.exceptions.ActorDiedError):
                return f"expert worker {worker} died: {error_summary(e)}"
            return f"expert worker {worker} failed: {error_summary(e)}"
        return None if self._stopping.is_set() else f"expert worker {worker} left its loop unexpectedly"
