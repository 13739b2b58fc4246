"""KServe v2 gRPC (`inference.GRPCInferenceService`, protos/kserve/v2/grpc_predict_v2.proto) on the gateway's gRPC
port, beside moecluster.v1: a thin adapter onto the request path every front shares (generations.py). The tensors
and parameters are in kserve_tensors.py.

  ServerLive / ServerReady / ModelReady   the gateway's liveness and readiness (open without an API key, as
                                          grpc.health.v1 is)
  ServerMetadata / ModelMetadata / ModelConfig
  ModelInfer        unary: the whole text; a refusal or failure ends the call with its status code
  ModelStreamInfer  Triton's bidirectional stream: requests run concurrently; one response per text delta, each
                    echoing the request's id, the last with triton_final_response=true; an error is a response with
                    error_message (and the id) while the stream and its other requests go on. The client cancelling
                    the stream (or one ModelInfer) aborts its requests on their routers, freeing their KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from importlib.metadata import PackageNotFoundError, version

from protos.kserve.v2 import grpc_predict_v2_pb2 as kpb
from protos.kserve.v2 import grpc_predict_v2_pb2_grpc as kpb_grpc
from router.gateway import kserve_tensors as tensors
from router.gateway.generations import Code, GatewayError, Generations
from router.request.messages import Delta, Final

log = logging.getLogger(__name__)
FRONT = "kserve"
SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
OPEN_METHODS = frozenset(f"/{SERVICE_NAME}/{m}" for m in ("ServerLive", "ServerReady"))
EXTENSIONS = ["parameters", "model_configuration", "model_stream_infer", "binary_tensor_data"]
_DONE, _READ_ALL = object(), object()


class KServeService(kpb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, generations: Generations):
        self.generations = generations

    # ---- health and metadata -------------------------------------------------------------------------------
    async def ServerLive(self, request, context) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=self.generations.health.live)

    async def ServerReady(self, request, context) -> kpb.ServerReadyResponse:
        health = self.generations.health
        return kpb.ServerReadyResponse(ready=health.ready and not health.draining)

    async def ModelReady(self, request: kpb.ModelReadyRequest, context) -> kpb.ModelReadyResponse:
        try:
            self.generations.check_model(request.name, "name")
        except GatewayError:
            return kpb.ModelReadyResponse(ready=False)
        return kpb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name="moecluster", version=_version(), extensions=EXTENSIONS)

    async def ModelMetadata(self, request: kpb.ModelMetadataRequest, context) -> kpb.ModelMetadataResponse:
        name, vision = await self._model(request.name, context)
        T = kpb.ModelMetadataResponse.TensorMetadata
        inputs = [T(name=n, datatype=d, shape=s) for n, d, s, _ in _input_specs(vision)]
        outputs = [
            T(name="text_output", datatype="BYTES", shape=[1]),
            T(name="output_ids", datatype="INT64", shape=[-1]),
        ]
        return kpb.ModelMetadataResponse(
            name=name, versions=["1"], platform="moecluster", inputs=inputs, outputs=outputs
        )

    async def ModelConfig(self, request: kpb.ModelConfigRequest, context) -> kpb.ModelConfigResponse:
        name, vision = await self._model(request.name, context)
        types = {"BYTES": kpb.TYPE_STRING, "INT64": kpb.TYPE_INT64, "INT32": kpb.TYPE_INT32, "BOOL": kpb.TYPE_BOOL}
        config = kpb.ModelConfig(
            name=name,
            platform="moecluster",
            backend="moecluster",
            max_batch_size=0,
            input=[
                kpb.ModelInput(name=n, data_type=types[d], dims=s, optional=o) for n, d, s, o in _input_specs(vision)
            ],
            output=[
                kpb.ModelOutput(name="text_output", data_type=kpb.TYPE_STRING, dims=[1]),
                kpb.ModelOutput(name="output_ids", data_type=kpb.TYPE_INT64, dims=[-1]),
            ],
            model_transaction_policy=kpb.ModelTransactionPolicy(decoupled=True),
        )
        return kpb.ModelConfigResponse(config=config)

    async def RepositoryIndex(self, request: kpb.RepositoryIndexRequest, context) -> kpb.RepositoryIndexResponse:
        """The one model served here: READY while new requests are taken, else UNAVAILABLE with the reason
        (`ready`: only if READY)."""
        g = self.generations
        if g.backend is None:
            return kpb.RepositoryIndexResponse()
        ready = g.health.ready and not g.health.draining
        if request.ready and not ready:
            return kpb.RepositoryIndexResponse()
        index = kpb.RepositoryIndexResponse.ModelIndex(
            name=g.backend.info.name,
            version="1",
            state="READY" if ready else "UNAVAILABLE",
            reason="" if ready else g.health.reason or "the server is shutting down",
        )
        return kpb.RepositoryIndexResponse(models=[index])

    async def _model(self, name: str, context):
        try:
            g = self.generations
            backend = g.backend_for(need_ready=False)
            if name and name != backend.info.name:
                raise GatewayError(Code.NOT_FOUND, f"name: {name!r} is not served here; this server serves "
                                   f"{backend.info.name!r}", "name")  # fmt: skip
            return backend.info.name, backend.vision is not None and backend.vision.max_images != 0
        except GatewayError as e:
            await context.abort(e.code, e.message)

    # ---- inference -----------------------------------------------------------------------------------------
    async def ModelInfer(self, request: kpb.ModelInferRequest, context) -> kpb.ModelInferResponse:
        try:
            return await self._whole(request, context)
        except GatewayError as e:
            await context.abort(e.code, e.message)

    async def _whole(self, request: kpb.ModelInferRequest, context) -> kpb.ModelInferResponse:
        rid = request.id or uuid.uuid4().hex
        admitted, parsed = self._admit(request, rid)
        text, ids = [], []
        async for item in self.generations.run(admitted, *_deadline(context)):
            if isinstance(item, Final):
                return tensors.response(self._name(), request.id, "".join(text), ids, parsed.outputs, item)
            text.append(item.text)
            ids.extend(item.token_ids)
        raise GatewayError(Code.UNAVAILABLE, "the engine stream ended without a final message")

    def _admit(self, request: kpb.ModelInferRequest, rid: str):
        parsed = []

        def build():
            parsed.append(tensors.engine_request(request, rid))
            return parsed[0].engine

        (admitted,) = self.generations.admit(build, request.model_name, FRONT, tensors.field_name)
        return admitted, parsed[0]

    def _name(self) -> str:
        return self.generations.backend.info.name

    async def ModelStreamInfer(self, request_iterator, context):
        queue: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        reader = asyncio.create_task(self._read(request_iterator, queue, tasks, context))
        reading, running = True, 0
        try:
            while reading or running:
                item = await queue.get()
                if item is _READ_ALL:
                    reading = False
                elif item is _DONE:
                    running -= 1
                elif isinstance(item, int):
                    running += item
                else:
                    yield item
        finally:  # the client cancelled (or the call ended): abort what still runs
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _read(self, request_iterator, queue: asyncio.Queue, tasks: set, context) -> None:
        try:
            async for request in request_iterator:
                queue.put_nowait(1)
                task = asyncio.create_task(self._stream_one(request, queue, context))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            queue.put_nowait(_READ_ALL)

    async def _stream_one(self, request: kpb.ModelInferRequest, queue: asyncio.Queue, context) -> None:
        rid = request.id or uuid.uuid4().hex
        try:
            admitted, parsed = self._admit(request, rid)
            buffered: list[Delta] = []
            async for item in self.generations.run(admitted, *_deadline(context)):
                out = self._streamed(item, request.id, parsed, buffered)
                if out is not None:
                    queue.put_nowait(kpb.ModelStreamInferResponse(infer_response=out))
        except GatewayError as e:
            log.info("stream request failed with %s: %s", e.code.name, e.message, extra={"request_id": rid})
            last = kpb.ModelInferResponse(model_name=request.model_name, id=request.id)
            last.parameters["triton_final_response"].bool_param = True
            queue.put_nowait(kpb.ModelStreamInferResponse(error_message=f"{e.code.name}: {e.message}",
                                                          infer_response=last))  # fmt: skip
        finally:
            queue.put_nowait(_DONE)

    def _streamed(self, item, rid: str, parsed: tensors.KServeRequest, buffered: list[Delta]):
        """The response for one engine item: a delta's text (buffered when the request said stream=false), or the
        final response."""
        model = self._name()
        if isinstance(item, Final):
            text = "".join(d.text for d in buffered)
            ids = [t for d in buffered for t in d.token_ids]
            return tensors.response(model, rid, text, ids, parsed.outputs, item, last=True)
        if parsed.stream is False:
            buffered.append(item)
            return None
        return tensors.response(model, rid, item.text, item.token_ids, parsed.outputs)


def _input_specs(vision: bool) -> list[tuple[str, str, list[int], bool]]:
    """(name, datatype, shape, optional) of each input."""
    specs = [
        ("text_input", "BYTES", [1], True),
        ("input_ids", "INT64", [-1], True),
        ("max_tokens", "INT32", [1], True),
        ("stream", "BOOL", [1], True),
    ]
    return specs + ([("image", "BYTES", [-1], True)] if vision else [])


def _deadline(context) -> tuple[float | None, object]:
    """run()'s deadline and expired(): a client deadline is enforced by gRPC itself."""
    remaining = context.time_remaining()
    expired = lambda: context.time_remaining() is not None and context.time_remaining() <= 0  # noqa: E731
    return (None if remaining is None else math.inf), expired


def _version() -> str:
    try:
        return version("moecluster")
    except PackageNotFoundError:
        return "0"
