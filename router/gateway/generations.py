"""The request path every front shares (moecluster.v1, KServe v2 gRPC, OpenAI HTTP): admission, limits, deadlines,
the router pool and the stream relay with router failover. A front translates its wire format to an
`EngineRequest`, calls `admit`, then reads `run`'s Deltas and Final and translates them back; it never sees a
router. The life of one generation:

  admit:  draining / no router ready -> UNAVAILABLE; other model -> NOT_FOUND; tokenize + validate
          (prepare_request, with the routers' limits and defaults; each image's header checked against the gateway's
          image limits and its tokens expanded, so they count) -> INVALID_ARGUMENT naming the field (in the front's
          own words: `field_path`); the engines' queues (waiting, as of the last poll) or open streams at their
          limits -> RESOURCE_EXHAUSTED; request_id in flight -> ALREADY_EXISTS; a sampled request without a seed
          gets one (so a failover can continue it exactly)
  route:  the least-loaded ready router (router_pool.py); the request stays on it
  run:    its Deltas, then one Final. If the router dies or its step raises, the relay continues the request on
          another router (stream_relay.py), images and all: the front sees only a pause
  end:    the front stops reading, its task is cancelled (client cancel, disconnect, deadline) -> abort on the
          request's router frees its KV blocks; the expert side gave up, or no router is left -> GatewayError

Errors carry a gRPC status code; the HTTP front maps it to an HTTP status (router/gateway/openai_errors.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import grpc

from router.gateway.affinity import ROUTE_BLOCKS
from router.gateway.cluster_view import ClusterView
from router.gateway.health import ClusterPoller, GatewayHealth
from router.gateway.metrics import GatewayMetrics
from router.gateway.router_pool import RouterPool
from router.gateway.stream_relay import NoRouter, StreamRelay
from router.images.request import VisionPrompt
from router.request.block_hash import BlockHashes, request_hashes
from router.request.errors import InvalidRequest
from router.request.messages import Delta, EngineRequest, ErrorKind, Final, FinishReason
from router.request.model_info import ModelInfo
from router.request.prepare import prepare_request
from router.request.sampling_params import resolve_seed
from router.request.tokenizer import Tokenizer

log = logging.getLogger(__name__)
Code = grpc.StatusCode


class GatewayError(Exception):
    """Ends one request with `code`; the message names the field when there is one."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = ""):
        super().__init__(message)
        self.code, self.message, self.field = code, message, field

    @property
    def outcome(self) -> str:
        return self.code.name.lower()


@dataclass(frozen=True)
class AdmissionLimits:
    """What the service enforces per request; from GatewayConfig, swappable while serving (Gateway.set_limits)."""

    max_concurrent_streams: int
    max_queued_requests: int
    ray_timeout_s: float = 10.0  # for control calls (stats, health); never for a generation
    request_timeout_s: float | None = None  # the deadline of a generation whose client set none
    failover_timeout_s: float = 600.0  # how long a stream whose router died waits for a router to continue on


@dataclass(frozen=True)
class Backend:
    """What the gateway holds once the cluster is up."""

    pool: RouterPool  # the routers, their readiness and load
    view: ClusterView  # the routers, workers and supervisor behind it
    info: ModelInfo  # RouterActor.model_info() of the first router
    tokenizer: Tokenizer | None
    poller: ClusterPoller
    vision: VisionPrompt | None = None  # the model's image tokens with the gateway's image limits; None: no images


@dataclass
class Admitted:
    """One admitted generation: its relay (registered in `Generations.streams` until `run` ends, holding the router
    it starts on), the front it came through and when it arrived."""

    relay: StreamRelay
    front: str
    arrived: float

    @property
    def request_id(self) -> str:
        return self.relay.request_id


def same_field(field: str) -> str:
    return field


class Generations:
    def __init__(self, limits: AdmissionLimits, health: GatewayHealth, metrics: GatewayMetrics):
        self.limits, self.health, self.metrics = limits, health, metrics
        self.backend: Backend | None = None
        self.streams: dict[str, StreamRelay] = {}  # request_id -> its relay, for every open generation
        self.router_failovers = 0  # streams moved off a lost router, since start

    def backend_for(self, need_ready: bool = True) -> Backend:
        """`need_ready`: for new generations; information calls are answered while starting up or draining."""
        if need_ready and self.health.draining:
            raise GatewayError(Code.UNAVAILABLE, "the server is shutting down; retry on another replica")
        if self.backend is None or (need_ready and not self.health.ready):
            raise GatewayError(Code.UNAVAILABLE, f"the cluster is not ready: {self.health.reason}")
        return self.backend

    def check_model(self, model: str, field: str = "model") -> Backend:
        """The backend, if `model` (empty: any) is the one served here; NOT_FOUND naming `field` otherwise."""
        backend = self.backend_for()
        name = backend.info.name
        if model and model != name:
            raise GatewayError(
                Code.NOT_FOUND,
                f"{field}: {model!r} is not served here; this server serves {name!r} (or leave {field} empty)",
                field,
            )
        return backend

    def admit(
        self,
        build: Callable[[], EngineRequest],
        model: str,
        front: str,
        field_path: Callable[[str], str] = same_field,
        arrived: float | None = None,
        choices: int = 1,
    ) -> list[Admitted]:
        """Checks and registers the request's generations (`choices` of them: OpenAI's `n`), all or none, or raises
        GatewayError (counted). `build()` translates the front's request (after the readiness and model checks; an
        InvalidRequest it raises is answered like the engine's own); `field_path` names an engine field as the
        front's client wrote it. No await in here: the checks and the registration of the streams happen as one
        step. The request is prepared once; each choice is a stream of its own (`<request_id>-<i>`; one choice keeps
        the request's id) with, when sampled, a seed of its own (the request's seed + i, as vLLM derives them); the
        prompt's cached blocks serve them all."""
        arrived = time.monotonic() if arrived is None else arrived
        try:
            return self._admit(build, model, front, field_path, arrived, choices)
        except GatewayError as e:
            self.count(front, e.outcome)
            raise

    def _admit(self, build, model: str, front: str, field_path, arrived: float, choices: int) -> list[Admitted]:
        backend = self.check_model(model)
        try:
            request = build()
            prepared = prepare_request(
                request,
                backend.tokenizer,
                backend.info.generation_defaults,
                backend.info.limits,
                backend.vision,
            )
        except InvalidRequest as e:
            path = field_path(e.field)
            raise GatewayError(Code.INVALID_ARGUMENT, f"{path}: {e.problem}", path) from None
        waiting = backend.pool.waiting  # as of the last poll
        if self.limits.max_queued_requests and waiting >= self.limits.max_queued_requests:
            raise GatewayError(
                Code.RESOURCE_EXHAUSTED,
                f"{waiting} requests are queued in the engines (limit {self.limits.max_queued_requests}); retry later",
            )
        rid, limit = request.request_id, self.limits.max_concurrent_streams
        if choices > limit:
            raise GatewayError(
                Code.INVALID_ARGUMENT,
                f"n: at most {limit} choices (the server's open-stream limit), got {choices}",
                "n",
            )
        ids = [rid] if choices == 1 else [f"{rid}-{i}" for i in range(choices)]
        for one in ids:
            if one in self.streams:
                raise GatewayError(Code.ALREADY_EXISTS, f"request_id: {one!r} is already in flight", "request_id")
        if len(self.streams) + choices > limit:
            need = "" if choices == 1 else f"; these {choices} choices need {choices}"
            raise GatewayError(
                Code.RESOURCE_EXHAUSTED,
                f"{len(self.streams)} Generate streams are open (limit {limit}) on all fronts together{need}; "
                "retry later",
            )
        blocks = _blocks(backend, prepared)
        if backend.pool.choose(hashes=blocks.hashes if blocks else ()) is None:
            raise GatewayError(Code.UNAVAILABLE, f"no router is ready: {backend.pool.reason}")
        # sampled: a seed of its own, so that a failover continues exactly where it stopped
        seed = None if prepared.params.greedy else resolve_seed(prepared.params)
        admitted = []
        for i, one in enumerate(ids):  # no await in between: every choice is admitted, or none
            params = prepared.params if seed is None else replace(prepared.params, seed=(seed + i) % 2**63)
            choice = replace(prepared, request_id=one, params=params)
            router = backend.pool.choose(hashes=blocks.hashes if blocks else ())
            relay = StreamRelay(
                backend.pool, choice, self.limits.failover_timeout_s, router, blocks, lambda: self._failed_over(front)
            )
            self.streams[one] = relay
            self.metrics.active_streams.inc()
            admitted.append(Admitted(relay, front, arrived))
        return admitted

    async def run(
        self, admitted: Admitted, deadline: float | None = None, expired: Callable[[], bool] = lambda: False
    ) -> AsyncIterator[Delta | Final]:
        """The generation's Deltas, then its Final (length, stop or abort). Raises GatewayError when it fails
        (counted and logged). `deadline` (time.monotonic()): None: the server's request_timeout_s; math.inf: none
        (the client set one of its own, which its transport enforces);
        `expired()` tells a deadline from a cancel when the front's task is cancelled. However it ends, the request
        is aborted on its router unless it finished, and its stream is unregistered."""
        relay, rid = admitted.relay, admitted.request_id
        if deadline is None and self.limits.request_timeout_s is not None:
            deadline = admitted.arrived + self.limits.request_timeout_s
        final = None
        try:
            last = None
            async for item in self._items(relay, deadline):
                if isinstance(item, Final):
                    final = item
                    break
                now = time.monotonic()
                self._observe_latency(admitted, last, now)
                last = now
                yield item
        except asyncio.CancelledError:
            outcome = "deadline_exceeded" if expired() else "cancelled"
            self.count(admitted.front, outcome)
            log.info("%s: aborted in the engine", outcome.replace("_", " "), extra={"request_id": rid})
            raise
        except GatewayError as e:
            self._fail(admitted, e)
        finally:
            relay.release()
            self.streams.pop(rid, None)
            self.metrics.active_streams.dec()
            if final is None:
                relay.abort()  # frees its KV blocks on the router holding it; a no-op if it already ended
        if final is None:
            self._fail(admitted, GatewayError(Code.UNAVAILABLE, "the engine stream ended without a final message"))
        if final.finish_reason is FinishReason.ERROR:
            self._fail(admitted, _engine_error(final))
        self._finished(admitted, final)
        yield final

    async def _items(self, relay: StreamRelay, deadline: float | None):
        items = relay.items()
        while True:
            try:
                timeout = None if deadline is None or math.isinf(deadline) else deadline - time.monotonic()
                yield await asyncio.wait_for(items.__anext__(), timeout)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise GatewayError(
                    Code.DEADLINE_EXCEEDED,
                    f"the request ran past the server's request_timeout_s ({self.limits.request_timeout_s}s); "
                    "set a longer deadline on the call to allow more",
                ) from None
            except NoRouter as e:
                raise GatewayError(Code.UNAVAILABLE, f"the cluster failed: {e}") from None

    def _fail(self, admitted: Admitted, error: GatewayError):
        self.count(admitted.front, error.outcome)
        log.warning("failed with %s: %s", error.code.name, error.message, extra={"request_id": admitted.request_id})
        raise error

    def _finished(self, admitted: Admitted, final: Final) -> None:
        self.count(admitted.front, final.finish_reason.value)
        self.metrics.prompt_tokens.inc(final.prompt_tokens)
        self.metrics.completion_tokens.inc(final.completion_tokens)
        elapsed = time.monotonic() - admitted.arrived
        self.metrics.front_seconds.labels(admitted.front).observe(elapsed)
        relay = admitted.relay
        log.info(
            "finished (%s): %d prompt + %d completion tokens in %.3fs%s",
            final.finish_reason.value,
            final.prompt_tokens,
            final.completion_tokens,
            elapsed,
            f" after {relay.failovers} router failover(s)" if relay.failovers else "",
            extra={"request_id": admitted.request_id},
        )

    def withdraw(self, admitted: Admitted) -> None:
        """Unregister an admitted generation that is not to run (a batch whose later prompt was refused)."""
        admitted.relay.release()
        if self.streams.pop(admitted.request_id, None) is not None:
            self.metrics.active_streams.dec()

    def _failed_over(self, front: str) -> None:
        self.router_failovers += 1
        self.metrics.router_failovers.labels(front).inc()

    def count(self, front: str, outcome: str) -> None:
        """One finished or refused request of `front`, by outcome (also in the all-fronts count)."""
        self.metrics.requests.labels(outcome).inc()
        self.metrics.front_requests.labels(front, outcome).inc()

    def _observe_latency(self, admitted: Admitted, last: float | None, now: float) -> None:
        if last is None:
            self.metrics.ttft.observe(now - admitted.arrived)
            self.metrics.front_ttft.labels(admitted.front).observe(now - admitted.arrived)
        else:
            self.metrics.itl.observe(now - last)

    def abort(self, request_ids) -> list[str]:
        """Abort these open generations in the engine (each then ends with finish_reason abort)."""
        aborted = [rid for rid in dict.fromkeys(request_ids) if rid in self.streams]
        for rid in aborted:
            self.streams[rid].abort()
        return aborted

    def abort_all(self) -> list[str]:
        """Abort every open generation in the engine (each then ends with finish_reason abort)."""
        return self.abort(list(self.streams))


def _blocks(backend: Backend, prepared) -> BlockHashes | None:
    """The request's block hashes with its first ROUTE_BLOCKS full blocks hashed (None: no affinity routing). Named
    as the routers name them: their block size, the salt, each image's content."""
    block_size = backend.info.block_size
    if backend.pool.affinity is None or not block_size:
        return None
    vision, images = backend.vision, prepared.images
    rows = [vision.patch_rows(im.grid) for im in images] if images else ()
    patch = vision.tokens.patch if images else None
    ids = prepared.prompt_ids
    blocks = request_hashes(block_size, prepared.cache_salt, ids, patch, rows, [im.data for im in images])
    blocks.extend(ids.__getitem__, min(len(ids), ROUTE_BLOCKS * block_size))
    return blocks


def _engine_error(final: Final) -> GatewayError:
    """An engine-side error after admission: a bad request the engine caught (INVALID_ARGUMENT), or an expert side
    that gave up (UNAVAILABLE). A router whose step raised is not one: the relay moved the request."""
    if final.error_kind is ErrorKind.REQUEST:
        return GatewayError(Code.INVALID_ARGUMENT, final.error or "invalid request", final.error_field or "")
    return GatewayError(Code.UNAVAILABLE, f"the cluster failed: {final.error}")
