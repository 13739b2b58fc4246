"""Drives the engine from one background thread and hands each request's deltas to asyncio consumers.

`generate(request)` is an async iterator of `Delta`s ending with one `Final`; leaving it early (client cancel,
deadline) aborts the request in the engine, which frees its KV blocks. A request with images is checked, then waits
here (on the event loop, never on the engine thread) for its image features, and only then joins the batch: the
engine never holds a request, nor a step, for an image. `abort`, `stats` and `add` are safe to
call from any thread or coroutine: commands go through a queue that the engine thread drains between steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from enum import Enum

from cluster.errors import ClusterFailure
from router.engine.engine import Engine
from router.images.errors import EncoderUnavailable
from router.images.features import ImageFeatures
from router.request.errors import InvalidRequest
from router.request.messages import Delta, EngineRequest, EngineStats, ErrorKind, Final, FinishReason
from router.request.prepare import request_images

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.5


class Command(Enum):
    """What a caller asks of the engine thread, through its queue."""

    ADD = "add"  # (EngineRequest, its image features)
    ABORT = "abort"  # request id
    WAKE = "wake"  # nothing: look at the stop flag


def _refused(request_id: str, e: InvalidRequest) -> Final:
    return Final(request_id, FinishReason.ERROR, error=str(e), error_kind=ErrorKind.REQUEST, error_field=e.field)


class AsyncEngine:
    def __init__(self, engine: Engine, images: ImageFeatures | None = None):
        """`images`: where image features come from (None: the model takes no images)."""
        self.engine, self.images = engine, images
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
                FinishReason.ERROR,
                error=f"request_id: {request.request_id!r} is already in flight",
                error_kind=ErrorKind.REQUEST,
                error_field="request_id",
            )
            return
        self._streams[request.request_id] = (loop, q)
        finished = False
        try:
            refusal = await self._submit(request)
            if refusal is not None:
                finished = True
                yield refusal
                return
            while True:
                item = await q.get()
                yield item
                if isinstance(item, Final):
                    finished = True
                    return
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:  # the consumer went away: free the request's blocks
                self._commands.put((Command.ABORT, request.request_id))

    async def _submit(self, request: EngineRequest) -> Final | None:
        """Queue the request for the engine thread, with its image features; a Final instead when they cannot be
        had (a refused image names its field; no encoder left is the cluster's failure)."""
        try:
            features = await self._features(request)
        except InvalidRequest as e:
            return _refused(request.request_id, e)
        except EncoderUnavailable as e:
            return Final(
                request.request_id,
                FinishReason.ERROR,
                error=f"image encoding failed: {e}",
                error_kind=ErrorKind.CLUSTER,
            )
        self._commands.put((Command.ADD, (request, features)))
        return None

    async def _features(self, request: EngineRequest) -> tuple:
        if not request_images(request):
            return ()
        prepared = self.engine.prepare(request)  # refuse a bad request before encoding anything
        assert self.images is not None, "the engine takes images but nothing encodes them"
        return tuple(await self.images.features(prepared.images))

    def abort(self, request_id: str) -> None:
        self._commands.put((Command.ABORT, request_id))

    def stats(self) -> EngineStats:
        return self._stats

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._commands.put((Command.WAKE, None))
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
                outputs = self.engine.fail_all(f"engine step failed: {type(e).__name__}: {e}", kind=ErrorKind.INTERNAL)
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

    def _apply(self, kind: Command, arg) -> None:
        if kind is Command.ADD:
            request, features = arg
            try:
                self.engine.add(request, features)
            except InvalidRequest as e:
                self._deliver(_refused(request.request_id, e))
            except ClusterFailure as e:  # the engine has failed: nothing can run
                self._deliver(Final(request.request_id, FinishReason.ERROR, error=str(e), error_kind=ErrorKind.CLUSTER))
        elif kind is Command.ABORT:
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
