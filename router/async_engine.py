"""Drives the engine from one background thread and hands each request's deltas to asyncio consumers.

`generate(request)` is an async iterator of `Delta`s ending with one `Final`; leaving it early (client cancel,
deadline) aborts the request in the engine, which frees its KV blocks. `abort`, `stats` and `add` are safe to
call from any thread or coroutine: commands go through a queue that the engine thread drains between steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import replace

from router.engine import Engine
from router.messages import Delta, EngineRequest, EngineStats, Final
from router.sampling_params import InvalidRequest

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.5


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats = engine.stats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def generate(self, request: EngineRequest) -> AsyncIterator[Delta | Final]:
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        if request.request_id in self._streams:
            yield Final(
                request.request_id,
                "error",
                error=f"request_id: {request.request_id!r} is already in flight",
                error_kind="request",
            )
            return
        self._streams[request.request_id] = (loop, q)
        self._commands.put(("add", request))
        finished = False
        try:
            while True:
                item = await q.get()
                yield item
                if isinstance(item, Final):
                    finished = True
                    return
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:  # the consumer went away: free the request's blocks
                self._commands.put(("abort", request.request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stats(self) -> EngineStats:
        return self._stats

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout=timeout_s)

    # ---- engine thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.has_work())
            try:
                outputs = self.engine.maintain()
                if self.engine.has_work():
                    outputs += self.engine.step()
            except Exception as e:
                log.exception("engine step failed")
                outputs = self.engine.fail_all(f"engine step failed: {type(e).__name__}: {e}", kind="internal")
            for item in outputs:
                self._deliver(item)
            self._stats = self.engine.stats()
        for request_id in list(self.engine.live):
            self._deliver(replace(self.engine.abort(request_id), error="the engine is shutting down"))

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, kind: str, arg) -> None:
        if kind == "add":
            try:
                self.engine.add(arg)
            except InvalidRequest as e:
                self._deliver(Final(arg.request_id, "error", error=str(e), error_kind="request"))
            except RuntimeError as e:  # the engine has failed (ClusterFailure): nothing can run
                self._deliver(Final(arg.request_id, "error", error=str(e), error_kind="cluster"))
        elif kind == "abort":
            final = self.engine.abort(arg)
            if final:
                self._deliver(final)

    def _deliver(self, item: Delta | Final) -> None:
        target = self._streams.get(item.request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)


async def collect(stream: AsyncIterator[Delta | Final]) -> dict:
    """A whole request's result from its stream: token ids, text, finish reason (and the error, if any)."""
    token_ids, text = [], []
    async for item in stream:
        if isinstance(item, Delta):
            token_ids += item.token_ids
            text.append(item.text)
        else:
            result = {"token_ids": token_ids, "text": "".join(text), "finish_reason": item.finish_reason}
            if item.matched_stop is not None:
                result["matched_stop"] = item.matched_stop
            if item.error:
                result["error"] = item.error
            return result
    raise RuntimeError("the stream ended without a final message")
