"""The OpenAI-compatible HTTP API: a Starlette app on the gateway's event loop (router/gateway/http_server.py
serves it), a thin adapter onto the request path every front shares (generations.py).

  GET  /v1/models, /v1/models/{model}     the served model
  POST /v1/completions                     prompt (text or token ids) -> text
  POST /v1/chat/completions                messages (text, image_url parts with data: URLs) -> message
  GET  /health                             liveness (200 / 503), open to all
  GET  /ready                              readiness (200 / 503 with the reason), open to all

`stream: true` answers with server-sent events (sse-starlette), ending in `data: [DONE]`. Errors are OpenAI's
JSON shape with the HTTP status of the gRPC code behind them (openai_response.HTTP_STATUS). A client that
disconnects (mid-stream, or while a non-streamed request runs) aborts its request: its KV blocks are freed.
API keys (`Authorization: Bearer <key>`) as on the gRPC port, checked by the same code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import aclosing

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from router.gateway.api_keys import ApiKeys
from router.gateway.auth import HEADER, ApiKeyInterceptor
from router.gateway.generations import Admitted, Code, GatewayError, Generations
from router.gateway.openai_request import OpenAIRequest, chat_request, completion_request, field_name
from router.gateway.openai_response import HTTP_STATUS, Reply, error_body
from router.request.errors import InvalidRequest
from router.request.messages import Final

log = logging.getLogger(__name__)
FRONT = "openai"


class OpenAIApi:
    def __init__(self, generations: Generations, api_keys: ApiKeys | None):
        self.generations = generations
        self.auth = ApiKeyInterceptor(api_keys) if api_keys else None
        self.app = Starlette(
            routes=[
                Route("/health", self.health),
                Route("/ready", self.ready),
                Route("/v1/models", self.models),
                Route("/v1/models/{model:path}", self.model),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            ]
        )

    # ---- open ----------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> JSONResponse:
        health = self.generations.health
        if health.live:
            return JSONResponse({"status": "live"})
        return _error(503, f"not live: {health.reason}")

    async def ready(self, request: Request) -> JSONResponse:
        health = self.generations.health
        if health.ready and not health.draining:
            return JSONResponse({"status": "ready"})
        return _error(503, f"not ready: {health.reason}")

    # ---- behind the API keys -------------------------------------------------------------------------------
    async def models(self, request: Request) -> JSONResponse:
        return self._guarded(request) or JSONResponse({"object": "list", "data": self._model_cards()})

    async def model(self, request: Request) -> JSONResponse:
        refused = self._guarded(request)
        if refused is not None:
            return refused
        cards = self._model_cards()
        name = request.path_params["model"]
        for card in cards:
            if card["id"] == name:
                return JSONResponse(card)
        return _error(404, f"model: {name!r} is not served here", "model", "model_not_found")

    async def completions(self, request: Request):
        return await self._generate(request, completion_request, chat=False)

    async def chat_completions(self, request: Request):
        return await self._generate(request, chat_request, chat=True)

    # ---- helpers -------------------------------------------------------------------------------------------
    def _guarded(self, request: Request) -> JSONResponse | None:
        """None if the request may proceed; else the 401 (or 503 while the cluster has not come up)."""
        if self.auth is not None:
            problem = self.auth.problem([(HEADER, v) for v in request.headers.getlist(HEADER)])
            if problem is not None:
                log.info("refused %s: %s", request.url.path, problem)
                self.generations.count(FRONT, "unauthenticated")
                return _error(
                    401, problem.replace("metadata 'authorization", "header 'Authorization"), code="invalid_api_key"
                )
        return None

    def _model_cards(self) -> list[dict]:
        backend = self.generations.backend
        if backend is None:
            return []
        info = backend.info
        return [
            {
                "id": info.name,
                "object": "model",
                "created": 0,
                "owned_by": "moecluster",
                "max_model_len": info.context_length,
            }
        ]

    async def _generate(self, request: Request, translate, chat: bool):
        arrived = time.monotonic()
        refused = self._guarded(request)
        if refused is not None:
            return refused
        prefix = "chatcmpl-" if chat else "cmpl-"
        rid = request.headers.get("x-request-id") or prefix + uuid.uuid4().hex
        try:
            body = await _json_body(request)
            parsed: OpenAIRequest = translate(body, rid)
        except InvalidRequest as e:
            self.generations.count(FRONT, "invalid_argument")
            return _error(400, str(e), e.field)
        try:
            admitted = self.generations.admit(lambda: parsed.engine, parsed.model, FRONT, field_name, arrived)
        except GatewayError as e:
            return _gateway_error(e)
        backend = self.generations.backend
        reply = Reply(chat, rid, backend.info.name, backend.tokenizer, want_logprobs=parsed.engine.params.logprobs)
        items = self.generations.run(admitted)
        if parsed.stream:
            return await self._stream(items, reply, parsed.include_usage)
        return await self._whole(request, admitted, items, reply)

    async def _whole(self, request: Request, admitted: Admitted, items, reply: Reply) -> JSONResponse:
        """Runs the request while watching the connection: a client that hangs up aborts it."""
        collect = asyncio.ensure_future(_collect(items, reply))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():  # the client left: cancelling aborts the request on its router
                log.info("the client disconnected: aborting", extra={"request_id": admitted.request_id})
                collect.cancel()
        try:
            final = await collect
        except asyncio.CancelledError:
            return _error(499, "the client disconnected")
        except GatewayError as e:
            return _gateway_error(e)
        return JSONResponse(reply.whole(final))

    async def _stream(self, items, reply: Reply, include_usage: bool):
        """The first item is awaited here: a failure before the first token is an HTTP error, not a 200 stream;
        and from then on the generator is running, so however the response ends its `finally` aborts it."""
        try:
            first = await items.__anext__()
        except GatewayError as e:
            return _gateway_error(e)
        return EventSourceResponse(_events(items, first, reply, include_usage), ping=15)


async def _events(items, first, reply: Reply, include_usage: bool):
    """Server-sent events: one chunk per Delta that carries something, the last ones, [DONE]; an error after the 200
    is an event too."""
    async with aclosing(items):
        try:
            item = first
            while True:
                if isinstance(item, Final):
                    for chunk in reply.last_chunks(item, include_usage):
                        yield {"data": json.dumps(chunk)}
                    break
                if reply.carries(item):
                    yield {"data": json.dumps(reply.chunk(item))}
                item = await items.__anext__()
        except GatewayError as e:
            yield {"data": json.dumps(error_body(HTTP_STATUS.get(e.code, 500), e.message, e.field))}
    yield {"data": "[DONE]"}


async def _collect(items, reply: Reply) -> Final:
    async with aclosing(items):
        async for item in items:
            if isinstance(item, Final):
                return item
            reply.add(item)
    raise GatewayError(Code.UNAVAILABLE, "the engine stream ended without a final message")


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body was read already, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequest("body", f"is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    return body


def _gateway_error(e: GatewayError) -> JSONResponse:
    status = HTTP_STATUS.get(e.code, 500)
    code = "model_not_found" if e.code == Code.NOT_FOUND else None
    return _error(status, e.message, e.field, code)


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)
