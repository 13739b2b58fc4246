"""Weight-loading progress of one actor, polled by the launcher for its progress display."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoadProgress:
    """Created by an actor's `load_progress()`, consumed by the launcher."""

    name: str  # "router", "worker 3"
    bytes_done: int
    bytes_total: int
    tensors_done: int
    done: bool
    error: str | None = None

    def line(self) -> str:
        pct = 100.0 * self.bytes_done / self.bytes_total if self.bytes_total else 100.0
        state = "ready" if self.done else f"{pct:5.1f}%"
        done, total = self.bytes_done / 1e6, self.bytes_total / 1e6
        return f"{self.name}: {done:.1f}/{total:.1f} MB, {self.tensors_done} tensors, {state}"
