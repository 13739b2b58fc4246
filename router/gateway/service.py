"""The `moecluster.v1.Inference` service: each RPC checked at the door, then answered through the routers' Ray
handles. The life of a Generate call:

  admit:  draining / no router ready -> UNAVAILABLE; other model -> NOT_FOUND; tokenize + validate
          (prepare_request, with the routers' limits and defaults; each image's header checked against the gateway's
          image limits and its tokens expanded, so they count) -> INVALID_ARGUMENT naming the field; the
          engines' queues (waiting, as of the last poll) or open streams at their limits -> RESOURCE_EXHAUSTED;
          request_id in flight -> ALREADY_EXISTS; a sampled request without a seed gets one (so a failover can
          continue it exactly)
  route:  the least-loaded ready router (router_pool.py); the request stays on it
  stream: its Deltas, then one Final -> Chunks, then Complete. If the router dies or its step raises, the relay
          continues the request on another router (stream_relay.py), images and all: the client sees only a pause
  end:    client cancel or deadline (the handler task is cancelled) -> abort on the request's router frees its
          KV blocks; the expert side gave up, or no router is left -> Error message, then UNAVAILABLE
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, replace

import grpc

from cluster.errors import RebalanceRefused, error_summary
from protos.moecluster.v1 import inference_pb2 as pb
from protos.moecluster.v1 import inference_pb2_grpc as pb_grpc
from router.gateway import convert
from router.gateway.cluster_status import gather_status
from router.gateway.cluster_view import ClusterView
from router.gateway.health import ClusterPoller, GatewayHealth
from router.gateway.metrics import GatewayMetrics
from router.gateway.router_pool import RouterEntry, RouterPool
from router.gateway.stream_relay import NoRouter, StreamRelay
from router.images.request import VisionPrompt
from router.request.errors import InvalidRequest
from router.request.messages import Delta, EngineRequest, ErrorKind, Final, FinishReason
from router.request.model_info import ModelInfo
from router.request.prepare import prepare_request, prompt_with_images
from router.request.sampling_params import resolve_seed
from router.request.tokenizer import Tokenizer

log = logging.getLogger(__name__)
Code = grpc.StatusCode


class GatewayError(Exception):
    """Ends one RPC with `code`; the message names the field when there is one."""

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
    request_timeout_s: float | None = None  # the deadline of a Generate whose client set none
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


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, limits: AdmissionLimits, health: GatewayHealth, metrics: GatewayMetrics):
        self.limits, self.health, self.metrics = limits, health, metrics
        self.backend: Backend | None = None
        self.streams: dict[str, StreamRelay] = {}  # request_id -> its relay, for every open Generate stream

    # ---- Generate ----------------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context):
        arrived = time.monotonic()
        try:
            _, relay, router = self._admit(request, request.request_id or uuid.uuid4().hex)
        except GatewayError as e:
            self.metrics.requests.labels(e.outcome).inc()
            await context.abort(e.code, e.message)
        self.metrics.active_streams.inc()
        try:
            async for response in self._stream(relay, router, request.stream, arrived, context):
                yield response
        finally:
            self.streams.pop(relay.request_id, None)
            self.metrics.active_streams.dec()

    def _admit(self, request: pb.GenerateRequest, request_id: str) -> tuple[Backend, StreamRelay, RouterEntry]:
        """No await in here: the checks and the registration of the stream happen as one step."""
        backend = self._backend()
        name = backend.info.name
        if request.model and request.model != name:
            raise GatewayError(
                Code.NOT_FOUND,
                f"model: {request.model!r} is not served here; this server serves {name!r} (or leave model empty)",
                "model",
            )
        try:
            prepared = prepare_request(
                convert.engine_request(request, request_id),
                backend.tokenizer,
                backend.info.generation_defaults,
                backend.info.limits,
                backend.vision,
            )
        except InvalidRequest as e:
            path = convert.field_path(e.field)
            raise GatewayError(Code.INVALID_ARGUMENT, f"{path}: {e.problem}", path) from None
        waiting = backend.pool.waiting  # as of the last poll
        if self.limits.max_queued_requests and waiting >= self.limits.max_queued_requests:
            raise GatewayError(
                Code.RESOURCE_EXHAUSTED,
                f"{waiting} requests are queued in the engines (limit {self.limits.max_queued_requests}); retry later",
            )
        if request_id in self.streams:
            raise GatewayError(Code.ALREADY_EXISTS, f"request_id: {request_id!r} is already in flight", "request_id")
        if len(self.streams) >= self.limits.max_concurrent_streams:
            raise GatewayError(
                Code.RESOURCE_EXHAUSTED,
                f"{len(self.streams)} Generate streams are open (limit "
                f"{self.limits.max_concurrent_streams}); retry later",
            )
        router = backend.pool.choose()
        if router is None:
            raise GatewayError(Code.UNAVAILABLE, f"no router is ready: {backend.pool.reason}")
        if not prepared.params.greedy:  # a seed of its own: a failover continues exactly where it stopped
            prepared = replace(prepared, params=replace(prepared.params, seed=resolve_seed(prepared.params)))
        relay = StreamRelay(backend.pool, prepared, self.limits.failover_timeout_s)
        self.streams[request_id] = relay
        return backend, relay, router

    async def _stream(self, relay: StreamRelay, router: RouterEntry, stream: bool, arrived: float, context):
        rid = relay.request_id
        buffered: list[Delta] = []
        last, final, error = None, None, None
        deadline = self._server_deadline(arrived, context)
        items = relay.items(router)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(
                        items.__anext__(), None if deadline is None else deadline - time.monotonic()
                    )
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    error = GatewayError(
                        Code.DEADLINE_EXCEEDED,
                        f"the request ran past the server's request_timeout_s ({self.limits.request_timeout_s}s); "
                        "set a longer deadline on the call to allow more",
                    )
                    break
                if isinstance(item, Final):
                    final = item
                    break
                now = time.monotonic()
                self._observe_latency(arrived if last is None else last, now, first=last is None)
                last = now
                if stream:
                    yield pb.GenerateResponse(request_id=rid, chunk=convert.chunk(item))
                else:
                    buffered.append(item)
        except NoRouter as e:
            error = GatewayError(Code.UNAVAILABLE, f"the cluster failed: {e}")
        except asyncio.CancelledError:  # client cancel or deadline: grpc cancels this task
            expired = context.time_remaining() is not None and context.time_remaining() <= 0
            self.metrics.requests.labels("deadline_exceeded" if expired else "cancelled").inc()
            log.info(
                "%s: aborted in the engine",
                "deadline exceeded" if expired else "cancelled by the client",
                extra={"request_id": rid},
            )
            raise
        finally:
            if final is None:
                relay.abort()  # frees its KV blocks on the router holding it; a no-op if it already ended
        if error is None and final is None:
            error = GatewayError(Code.UNAVAILABLE, "the engine stream ended without a final message")
        elif final is not None and final.finish_reason is FinishReason.ERROR:
            error = self._engine_error(final)
        if error is not None:
            self.metrics.requests.labels(error.outcome).inc()
            log.warning("failed with %s: %s", error.code.name, error.message, extra={"request_id": rid})
            yield pb.GenerateResponse(
                request_id=rid, error=pb.Error(code=error.code.name, message=error.message, field=error.field)
            )
            await context.abort(error.code, error.message)
        if buffered:
            yield pb.GenerateResponse(request_id=rid, chunk=convert.merged_chunk(buffered))
        self.metrics.requests.labels(final.finish_reason.value).inc()
        self.metrics.prompt_tokens.inc(final.prompt_tokens)
        self.metrics.completion_tokens.inc(final.completion_tokens)
        log.info(
            "finished (%s): %d prompt + %d completion tokens in %.3fs%s",
            final.finish_reason,
            final.prompt_tokens,
            final.completion_tokens,
            time.monotonic() - arrived,
            f" after {relay.failovers} router failover(s)" if relay.failovers else "",
            extra={"request_id": rid},
        )
        yield pb.GenerateResponse(request_id=rid, complete=convert.complete(final))

    def _server_deadline(self, arrived: float, context) -> float | None:
        """The server's own deadline when the client set none (a client deadline is enforced by gRPC itself)."""
        if self.limits.request_timeout_s is None or context.time_remaining() is not None:
            return None
        return arrived + self.limits.request_timeout_s

    def _observe_latency(self, since: float, now: float, first: bool) -> None:
        (self.metrics.ttft if first else self.metrics.itl).observe(now - since)

    @staticmethod
    def _engine_error(final: Final) -> GatewayError:
        """An engine-side error after admission: a bad request the engine caught (INVALID_ARGUMENT), or an expert
        side that gave up (UNAVAILABLE). A router whose step raised is not one: the relay moved the request."""
        if final.error_kind is ErrorKind.REQUEST:
            return GatewayError(Code.INVALID_ARGUMENT, final.error or "invalid request", final.error_field or "")
        return GatewayError(Code.UNAVAILABLE, f"the cluster failed: {final.error}")

    # ---- the other RPCs ----------------------------------------------------------------------------------
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            return pb.TokenizeResponse(token_ids=self._tokenize(request))
        except GatewayError as e:
            await context.abort(e.code, e.message)

    def _tokenize(self, request: pb.TokenizeRequest) -> list[int]:
        backend = self._backend(need_ready=False)
        kind = request.WhichOneof("input")
        if kind is None:
            raise GatewayError(Code.INVALID_ARGUMENT, "input: the request is empty; set prompt or messages", "input")
        if backend.tokenizer is None:
            raise GatewayError(Code.FAILED_PRECONDITION, f"{kind}: this model has no tokenizer.json", kind)
        try:
            if kind == "prompt":
                images = convert.request_images(request.images)
                ids = backend.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
                req = EngineRequest("tokenize", None, prompt_ids=tuple(ids), images=images)
            else:
                if request.images:
                    raise InvalidRequest("images", "a chat's images go in its messages' parts")
                req = EngineRequest("tokenize", None, messages=convert.chat_messages(request.messages))
            return prompt_with_images(req, backend.tokenizer, backend.vision, kind)[0]
        except InvalidRequest as e:
            raise GatewayError(Code.INVALID_ARGUMENT, str(e), e.field) from None

    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        try:
            backend = self._backend(need_ready=False)
            return convert.model_info(backend.info, backend.vision)
        except GatewayError as e:
            await context.abort(e.code, e.message)

    async def GetClusterStatus(self, request, context) -> pb.GetClusterStatusResponse:
        try:
            return await self._cluster_status()
        except GatewayError as e:
            await context.abort(e.code, e.message)

    async def _cluster_status(self) -> pb.GetClusterStatusResponse:
        backend = self._backend(need_ready=False)
        gateway = pb.GatewayStatus(
            active_streams=len(self.streams),
            draining=self.health.draining,
            max_concurrent_streams=self.limits.max_concurrent_streams,
            max_queued_requests=self.limits.max_queued_requests,
        )
        return await gather_status(backend.view, gateway, self.limits.ray_timeout_s)

    async def Rebalance(self, request: pb.RebalanceRequest, context) -> pb.RebalanceResponse:
        try:
            backend = self._backend(need_ready=False)
            plan = await asyncio.to_thread(backend.view.rebalance)
        except GatewayError as e:
            await context.abort(e.code, e.message)
        except RebalanceRefused as e:
            await context.abort(Code.FAILED_PRECONDITION, error_summary(e))
        generation = backend.view.supervision().generation
        if plan is None:
            return pb.RebalanceResponse(
                applied=False,
                map_generation=generation,
                message="the map is already as balanced as the loads since the last rebalance allow",
            )
        log.warning("rebalanced on request: map generation %d", generation)
        return pb.RebalanceResponse(
            applied=True,
            map_generation=plan.expert_map.generation,
            imbalance_before=plan.before,
            imbalance_after=plan.after,
            copies_loaded=plan.moved,
            message="applied",
        )

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        aborted = [rid for rid in dict.fromkeys(request.request_ids) if rid in self.streams]
        for rid in aborted:
            self.streams[rid].abort()
        return pb.AbortResponse(aborted=aborted)

    def abort_all(self) -> list[str]:
        """Abort every open stream in the engine (each then ends with a Complete, finish_reason ABORT)."""
        relays = list(self.streams.values())
        for relay in relays:
            relay.abort()
        return [relay.request_id for relay in relays]

    # ---- helpers -----------------------------------------------------------------------------------------
    def _backend(self, need_ready: bool = True) -> Backend:
        """`need_ready`: for new generations; information RPCs are answered while starting up or draining."""
        if need_ready and self.health.draining:
            raise GatewayError(Code.UNAVAILABLE, "the server is shutting down; retry on another replica")
        if self.backend is None or (need_ready and not self.health.ready):
            raise GatewayError(Code.UNAVAILABLE, f"the cluster is not ready: {self.health.reason}")
        return self.backend
