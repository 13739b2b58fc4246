"""One Generate call, relayed from a router to the client, surviving the router's death.

The relay keeps what the client has been sent: the tokens and the number of characters of their text. When the
router dies (its Ray streaming call fails) or its step raises (a Final with ErrorKind.INTERNAL), the relay
re-admits the request on another ready router (or waits, within `failover_timeout_s`, for one: with a single
router, for its replacement) with the prompt plus the tokens already streamed (`Resume`). A request's images stay
with the relay (their bytes and grids: the prompt ids already hold their tokens) and go along each time. The new router
recomputes their KV, rebuilds the text stream, and samples on: sampling is a pure function of (seed, position)
and the gateway gave every sampled request a seed at admission, so the client sees a pause, no error, and no
token twice or missing. Cancel, deadline and Abort reach whichever router holds the request now.

With cache-affinity routing the relay carries the request's block hashes (router/request/block_hash.py): the router it
streams from is recorded as holding them (the prompt's when it starts, the prompt's and the generated tokens' when it
ends), and a failover's re-prefill goes to the router holding the longest run of them when the load allows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

import ray

from router.gateway.affinity import ROUTE_BLOCKS
from router.gateway.health import first_line
from router.gateway.router_pool import RouterEntry, RouterPool
from router.request.block_hash import BlockHashes
from router.request.messages import Delta, EngineRequest, ErrorKind, Final, FinishReason, Resume
from router.request.prepare import PreparedRequest

log = logging.getLogger(__name__)
MAX_FAILOVERS = 3  # per request: a request that fails on every router it meets is not retried forever


class RouterLost(Exception):
    """The router holding a request died or failed; the message says how."""


class NoRouter(Exception):
    """No router became ready within the failover timeout."""


class StreamRelay:
    def __init__(
        self,
        pool: RouterPool,
        prepared: PreparedRequest,
        failover_timeout_s: float,
        first: RouterEntry,
        blocks: BlockHashes | None = None,
        on_failover: Callable[[], None] = lambda: None,
    ):
        """`first`: the router chosen at admission, counted as loaded by this stream from now on. `blocks`: the
        request's block hashes, for cache-affinity routing (None: least-loaded routing). `on_failover`: called each
        time the stream's router is lost and it is to continue on another."""
        self.pool, self.prepared, self.failover_timeout_s = pool, prepared, failover_timeout_s
        self.on_failover = on_failover
        self.first, self.blocks = first, blocks
        self.tokens: list[int] = []
        self.text_chars = 0
        self.tool_parts = 0
        self.router: RouterEntry | None = None
        self.failovers = 0
        self._holding: RouterEntry | None = None
        self._hold(first)

    @property
    def request_id(self) -> str:
        return self.prepared.request_id

    async def items(self) -> AsyncIterator[Delta | Final]:
        """Deltas, then one Final, whichever routers it takes. NoRouter if none is left to continue on."""
        entry = self.first
        while True:
            try:
                async for item in self._from(entry):
                    yield item
                return
            except RouterLost as e:
                self.pool.mark_down(entry, str(e))
                self.failovers += 1
                self.on_failover()
                if self.failovers > MAX_FAILOVERS:
                    raise NoRouter(f"{self.failovers} routers failed this request in turn; the last: {e}") from None
                log.warning(
                    "router %d lost this request after %d tokens (%s); continuing on another router",
                    entry.index,
                    len(self.tokens),
                    e,
                    extra={"request_id": self.request_id},
                )
                entry = await self.pool.wait_for_one(
                    time.monotonic() + self.failover_timeout_s, avoid=entry, hashes=self._hashes()
                )
                if entry is None:
                    raise NoRouter(
                        f"router lost ({e}) and no router was ready within {self.failover_timeout_s:.0f}s "
                        "to continue on"
                    ) from None

    async def _from(self, entry: RouterEntry) -> AsyncIterator[Delta | Final]:
        self.router = entry
        self._hold(entry)
        self.pool.sent(entry, self._hashes())
        try:
            gen = entry.handle.generate_stream.options(num_returns="streaming").remote(self._request())
            async for ref in gen:
                item = await ref
                if isinstance(item, Final):
                    if item.finish_reason is FinishReason.ERROR and item.error_kind is ErrorKind.INTERNAL:
                        raise RouterLost(f"its step failed: {item.error}")
                    self.pool.sent(entry, self._hashes())  # its cache now holds the generated tokens' blocks too
                    yield item
                    return
                self.tokens += item.token_ids
                self.text_chars += len(item.text)
                self.tool_parts += len(item.tool_call_parts)
                yield item
        except ray.exceptions.RayError as e:
            raise RouterLost(first_line(e)) from None
        finally:
            self.release()
        raise RouterLost("its stream ended without a final message")

    def _hold(self, entry: RouterEntry) -> None:
        if self._holding is not entry:
            self.release()
            entry.assigned += 1
            self._holding = entry

    def release(self) -> None:
        """This stream no longer loads the router it was counted on (idempotent)."""
        if self._holding is not None:
            self._holding.assigned -= 1
            self._holding = None

    def _hashes(self) -> list[bytes]:
        """The hashes of the leading full blocks of the prompt and the tokens streamed so far (what a router
        computes), at most ROUTE_BLOCKS: routing looks no further."""
        if self.blocks is None:
            return []
        prompt, tokens = self.prepared.prompt_ids, self.tokens
        n, most = len(prompt), ROUTE_BLOCKS * self.blocks.block_size
        return list(self.blocks.extend(lambda i: prompt[i] if i < n else tokens[i - n], min(n + len(tokens), most)))

    def _request(self) -> EngineRequest:
        p = self.prepared
        resume = Resume(tuple(self.tokens), self.text_chars, self.tool_parts) if self.failovers else None
        return EngineRequest(
            p.request_id, p.params, prompt_ids=p.prompt_ids, resume=resume, images=p.images, cache_salt=p.cache_salt
        )

    def abort(self) -> None:
        """Abort it on the router holding it now (frees its KV blocks; a no-op if it already ended)."""
        if self.router is not None:
            try:
                self.router.handle.abort.remote(self.request_id)
            except ray.exceptions.RayError:
                pass  # that router is gone: nothing to free
