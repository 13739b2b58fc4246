"""The `moecluster.v1.Inference` service: each RPC translated (convert.py) onto the request path every front shares
(generations.py: admission, limits, deadlines, the router pool, the stream relay with router failover) and back.

Generate: a refusal -> the RPC ends with its status code (INVALID_ARGUMENT naming the proto field, NOT_FOUND,
RESOURCE_EXHAUSTED, UNAVAILABLE, ALREADY_EXISTS); then Chunks (one per Delta, or one merged when not streaming), then
Complete; a failure after admission -> an Error message, then the status. Client cancel or deadline cancels the
handler, which aborts the request on its router (its KV blocks are freed).
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid

from cluster.errors import RebalanceRefused, error_summary
from protos.moecluster.v1 import inference_pb2 as pb
from protos.moecluster.v1 import inference_pb2_grpc as pb_grpc
from router.gateway import convert
from router.gateway.cluster_status import gather_status
from router.gateway.generations import Code, GatewayError, Generations
from router.request.errors import InvalidRequest
from router.request.messages import Delta, EngineRequest, Final
from router.request.prepare import prompt_with_images

log = logging.getLogger(__name__)
FRONT = "moecluster"


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, generations: Generations):
        self.generations = generations
        self.fronts: list[pb.Front] = []  # what the gateway listens on (Gateway.start fills it in)

    # ---- Generate ----------------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context):
        rid = request.request_id or uuid.uuid4().hex
        try:
            (admitted,) = self.generations.admit(
                lambda: convert.engine_request(request, rid), request.model, FRONT, convert.field_path
            )
        except GatewayError as e:
            await context.abort(e.code, e.message)
        client_deadline = context.time_remaining() is not None  # enforced by gRPC itself
        expired = lambda: context.time_remaining() is not None and context.time_remaining() <= 0  # noqa: E731
        buffered: list[Delta] = []
        calls: list = []  # the tool calls of the output, for the Complete
        try:
            async for item in self.generations.run(admitted, math.inf if client_deadline else None, expired):
                if isinstance(item, Final):
                    if buffered:
                        yield pb.GenerateResponse(request_id=rid, chunk=convert.merged_chunk(buffered))
                    yield pb.GenerateResponse(request_id=rid, complete=convert.complete(item, calls))
                    continue
                calls += item.tool_calls
                if request.stream:
                    yield pb.GenerateResponse(request_id=rid, chunk=convert.chunk(item))
                else:
                    buffered.append(item)
        except GatewayError as e:
            yield pb.GenerateResponse(
                request_id=rid, error=pb.Error(code=e.code.name, message=e.message, field=e.field)
            )
            await context.abort(e.code, e.message)

    # ---- the other RPCs ----------------------------------------------------------------------------------
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            return pb.TokenizeResponse(token_ids=self._tokenize(request))
        except GatewayError as e:
            await context.abort(e.code, e.message)

    def _tokenize(self, request: pb.TokenizeRequest) -> list[int]:
        backend = self.generations.backend_for(need_ready=False)
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
            backend = self.generations.backend_for(need_ready=False)
            return convert.model_info(backend.info, backend.vision)
        except GatewayError as e:
            await context.abort(e.code, e.message)

    async def GetClusterStatus(self, request, context) -> pb.GetClusterStatusResponse:
        try:
            return await self._cluster_status()
        except GatewayError as e:
            await context.abort(e.code, e.message)

    async def _cluster_status(self) -> pb.GetClusterStatusResponse:
        g = self.generations
        backend = g.backend_for(need_ready=False)
        gateway = pb.GatewayStatus(
            active_streams=len(g.streams),
            router_failovers=g.router_failovers,
            draining=g.health.draining,
            max_concurrent_streams=g.limits.max_concurrent_streams,
            max_queued_requests=g.limits.max_queued_requests,
            fronts=self.fronts,
        )
        return await gather_status(backend.view, gateway, g.limits.ray_timeout_s)

    async def Rebalance(self, request: pb.RebalanceRequest, context) -> pb.RebalanceResponse:
        try:
            backend = self.generations.backend_for(need_ready=False)
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
        return pb.AbortResponse(aborted=self.generations.abort(request.request_ids))
