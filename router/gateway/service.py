"""The `moecluster.v1.Inference` service: each RPC checked at the door, then answered through the router
actor's Ray handle. The life of a Generate call:

  admit:  draining / not ready -> UNAVAILABLE; other model -> NOT_FOUND; tokenize + validate (prepare_request,
          with the router's limits and defaults) -> INVALID_ARGUMENT naming the field; engine queue (its
          waiting count as of the last poll) or open streams at their limits -> RESOURCE_EXHAUSTED;
          request_id in flight -> ALREADY_EXISTS
  stream: router.generate_stream (a Ray streaming call) yields Deltas, then one Final -> Chunks, then Complete
  end:    client cancel or deadline (the handler task is cancelled) -> router.abort frees the KV blocks;
          the router or a worker died, or the engine failed -> Error message, then UNAVAILABLE
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import grpc
import ray

from protos.moecluster.v1 import inference_pb2 as pb
from protos.moecluster.v1 import inference_pb2_grpc as pb_grpc
from router.chat import render_chat
from router.gateway import convert
from router.gateway.cluster_view import ClusterView
from router.gateway.health import ClusterPoller, GatewayHealth, first_line, resolve
from router.gateway.metrics import GatewayMetrics
from router.messages import Delta, EngineRequest, Final
from router.request_prep import PreparedRequest, prepare_request
from router.sampling_params import InvalidRequest
from router.tokenizer import Tokenizer

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


@dataclass(frozen=True)
class Backend:
    """What the gateway holds once the cluster is up."""

    router: object  # the RouterActor handle
    view: ClusterView  # the workers and the supervisor behind it
    info: dict  # RouterActor.model_info()
    tokenizer: Tokenizer | None
    poller: ClusterPoller


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, limits: AdmissionLimits, health: GatewayHealth, metrics: GatewayMetrics):
        self.limits, self.health, self.metrics = limits, health, metrics
        self.backend: Backend | None = None
        self.streams: dict[str, float] = {}  # request_id -> arrival, for every open Generate stream

    # ---- Generate ----------------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context):
        arrived = time.monotonic()
        try:
            backend, prepared = self._admit(request, request.request_id or uuid.uuid4().hex)
        except GatewayError as e:
            self.metrics.requests.labels(e.outcome).inc()
            await context.abort(e.code, e.message)
        self.metrics.active_streams.inc()
        try:
            async for response in self._stream(backend, prepared, request.stream, arrived, context):
                yield response
        finally:
            self.streams.pop(prepared.request_id, None)
            self.metrics.active_streams.dec()

    def _admit(self, request: pb.GenerateRequest, request_id: str) -> tuple[Backend, PreparedRequest]:
        """No await in here: the checks and the registration of the stream happen as one step."""
        backend = self._backend()
        name = backend.info["name"]
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
                backend.info["generation_defaults"],
                backend.info["limits"],
            )
        except InvalidRequest as e:
            path = convert.field_path(e.field)
            raise GatewayError(Code.INVALID_ARGUMENT, f"{path}: {str(e).split(': ', 1)[1]}", path) from None
        waiting = backend.poller.engine.waiting if backend.poller.engine else 0  # as of the last poll
        if self.limits.max_queued_requests and waiting >= self.limits.max_queued_requests:
            raise GatewayError(
                Code.RESOURCE_EXHAUSTED,
                f"{waiting} requests are queued in the engine (limit {self.limits.max_queued_requests}); retry later",
            )
        if request_id in self.streams:
            raise GatewayError(Code.ALREADY_EXISTS, f"request_id: {request_id!r} is already in flight", "request_id")
        if len(self.streams) >= self.limits.max_concurrent_streams:
            raise GatewayError(
                Code.RESOURCE_EXHAUSTED,
                f"{len(self.streams)} Generate streams are open (limit "
                f"{self.limits.max_concurrent_streams}); retry later",
            )
        self.streams[request_id] = time.monotonic()
        return backend, prepared

    async def _stream(self, backend: Backend, prepared: PreparedRequest, stream: bool, arrived: float, context):
        rid = prepared.request_id
        request = EngineRequest(rid, prepared.params, prompt_ids=prepared.prompt_ids)
        buffered: list[Delta] = []
        last, final, error = None, None, None
        deadline = self._server_deadline(arrived, context)
        try:
            gen = backend.router.generate_stream.options(num_returns="streaming").remote(request)
            while True:
                try:
                    ref = await asyncio.wait_for(
                        gen.__anext__(), None if deadline is None else deadline - time.monotonic()
                    )
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    error = GatewayError(
                        Code.DEADLINE_EXCEEDED,
                        f"the request ran past the server's "
                        f"request_timeout_s ({self.limits.request_timeout_s}s); set a longer deadline "
                        "on the call to allow more",
                    )
                    break
                item = await ref
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
        except ray.exceptions.RayError as e:
            error = GatewayError(Code.UNAVAILABLE, f"the cluster failed: {first_line(e)}")
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
                backend.router.abort.remote(rid)  # frees its KV blocks; a no-op if it already ended
        if error is None and final is None:
            error = GatewayError(Code.UNAVAILABLE, "the engine stream ended without a final message")
        elif final is not None and final.finish_reason == "error":
            error = await self._engine_error(backend, final)
        if error is not None:
            self.metrics.requests.labels(error.outcome).inc()
            log.warning("failed with %s: %s", error.code.name, error.message, extra={"request_id": rid})
            yield pb.GenerateResponse(
                request_id=rid, error=pb.Error(code=error.code.name, message=error.message, field=error.field)
            )
            await context.abort(error.code, error.message)
        if buffered:
            yield pb.GenerateResponse(request_id=rid, chunk=convert.merged_chunk(buffered))
        self.metrics.requests.labels(final.finish_reason).inc()
        self.metrics.prompt_tokens.inc(final.prompt_tokens)
        self.metrics.completion_tokens.inc(final.completion_tokens)
        log.info(
            "finished (%s): %d prompt + %d completion tokens in %.3fs",
            final.finish_reason,
            final.prompt_tokens,
            final.completion_tokens,
            time.monotonic() - arrived,
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

    async def _engine_error(self, backend: Backend, final: Final) -> GatewayError:
        """An engine-side error after admission: a bad request the engine caught (INVALID_ARGUMENT), a broken
        cluster (UNAVAILABLE) or a bug (INTERNAL)."""
        if final.error_kind == "request":
            return GatewayError(Code.INVALID_ARGUMENT, final.error or "invalid request")
        ready, reason = await backend.poller.check()
        if final.error_kind == "cluster" or not ready:
            await self.health.set_ready(False, reason)
            return GatewayError(Code.UNAVAILABLE, f"the cluster failed: {final.error or reason}")
        return GatewayError(Code.INTERNAL, final.error or "the engine failed")

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
        if kind == "prompt":
            return backend.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        try:
            text = render_chat(convert.chat_messages(request.messages))
        except InvalidRequest as e:
            raise GatewayError(Code.INVALID_ARGUMENT, str(e), e.field) from None
        return backend.tokenizer.encode(text, add_special_tokens=False)

    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        try:
            return convert.model_info(self._backend(need_ready=False).info)
        except GatewayError as e:
            await context.abort(e.code, e.message)

    async def GetClusterStatus(self, request, context) -> pb.GetClusterStatusResponse:
        try:
            return await self._cluster_status()
        except GatewayError as e:
            await context.abort(e.code, e.message)

    async def _cluster_status(self) -> pb.GetClusterStatusResponse:
        backend = self._backend(need_ready=False)
        router = backend.router
        health, stats, engine = await asyncio.gather(
            self._call(router.health.remote()),
            self._call(router.stats.remote()),
            self._call(router.engine_stats.remote()),
        )
        workers = await asyncio.gather(*(self._answer(w.stats.remote()) for w in backend.view.workers))
        supervision = backend.view.supervision()
        gateway = pb.GatewayStatus(
            active_streams=len(self.streams),
            draining=self.health.draining,
            max_concurrent_streams=self.limits.max_concurrent_streams,
            max_queued_requests=self.limits.max_queued_requests,
        )
        expert_map = stats["expert_map"]
        slots = {s["slot"]: s for s in (supervision or {}).get("slots", [])}
        members = stats["channel"]["members"] if stats["channel"] else ()
        out = pb.GetClusterStatusResponse(
            router=convert.router_status(health, stats, engine),
            workers=[convert.worker_status(slot, w, slots.get(slot), members) for slot, w in enumerate(workers)],
            placement=convert.placement(expert_map),
            gateway=gateway,
        )
        if stats["channel"] is not None:
            out.expert_plane.CopyFrom(convert.expert_plane(stats["channel"], supervision, expert_map))
        return out

    async def Rebalance(self, request: pb.RebalanceRequest, context) -> pb.RebalanceResponse:
        try:
            backend = self._backend(need_ready=False)
            if backend.view.supervision() is None:
                raise GatewayError(
                    Code.FAILED_PRECONDITION,
                    "the router holds every expert (workers: 0): there is nothing to rebalance",
                )
            plan = await asyncio.to_thread(backend.view.rebalance)
        except GatewayError as e:
            await context.abort(e.code, e.message)
        except RuntimeError as e:
            await context.abort(Code.FAILED_PRECONDITION, str(e))
        generation = backend.view.supervision()["generation"]
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
        if aborted:
            backend = self._backend(need_ready=False)
            for rid in aborted:
                backend.router.abort.remote(rid)
        return pb.AbortResponse(aborted=aborted)

    def abort_all(self) -> list[str]:
        """Abort every open stream in the engine (each then ends with a Complete, finish_reason ABORT)."""
        ids = list(self.streams)
        if ids and self.backend is not None:
            for rid in ids:
                self.backend.router.abort.remote(rid)
        return ids

    # ---- helpers -----------------------------------------------------------------------------------------
    def _backend(self, need_ready: bool = True) -> Backend:
        """`need_ready`: for new generations; information RPCs are answered while starting up or draining."""
        if need_ready and self.health.draining:
            raise GatewayError(Code.UNAVAILABLE, "the server is shutting down; retry on another replica")
        if self.backend is None or (need_ready and not self.health.ready):
            raise GatewayError(Code.UNAVAILABLE, f"the cluster is not ready: {self.health.reason}")
        return self.backend

    async def _answer(self, ref):
        """A status call's value, or None when the actor does not answer (dead, or not started yet)."""
        try:
            return await resolve(ref, self.limits.ray_timeout_s)
        except (ray.exceptions.RayError, asyncio.TimeoutError):
            return None

    async def _call(self, ref):
        try:
            return await resolve(ref, self.limits.ray_timeout_s)
        except ray.exceptions.RayError as e:
            raise GatewayError(Code.UNAVAILABLE, f"the cluster failed: {first_line(e)}") from None
        except asyncio.TimeoutError:
            raise GatewayError(
                Code.UNAVAILABLE, f"the cluster did not answer within {self.limits.ray_timeout_s}s"
            ) from None
