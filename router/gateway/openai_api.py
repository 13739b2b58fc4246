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
import functools
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
from router.gateway.generations import Code, GatewayError, Generations
from router.gateway.openai_request import OpenAIRequest, chat_request, completion_request, field_name
from router.gateway.openai_response import HTTP_STATUS, Reply, error_body, usage, whole_response
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
        choices = []  # prompt p's choice j at p * n + j (OpenAI's index)
        batch = len(parsed.engines) > 1
        try:
            for p, engine in enumerate(parsed.engines):
                path = functools.partial(_batch_field, p) if batch else field_name
                choices += self.generations.admit(lambda e=engine: e, parsed.model, FRONT, path, arrived, parsed.n)
        except GatewayError as e:
            for admitted in choices:  # all or none
                self.generations.withdraw(admitted)
            return _gateway_error(e)
        backend = self.generations.backend
        want_logprobs = parsed.engine.params.logprobs
        replies = [
            Reply(chat, rid, backend.info.name, backend.tokenizer, want_logprobs=want_logprobs, index=i)
            for i in range(len(choices))
        ]
        runs = [self.generations.run(admitted) for admitted in choices]
        if parsed.stream:
            return await self._stream(runs, replies, parsed.include_usage, parsed.n)
        return await self._whole(request, rid, runs, replies, parsed.n)

    async def _whole(self, request: Request, rid: str, runs, replies: list[Reply], n: int) -> JSONResponse:
        """Runs the choices while watching the connection: a client that hangs up aborts them."""
        collect = asyncio.ensure_future(_collect_all(runs, replies))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():  # the client left: cancelling aborts the request on its router
                log.info("the client disconnected: aborting", extra={"request_id": rid})
                collect.cancel()
        try:
            finals = await collect
        except asyncio.CancelledError:
            return _error(499, "the client disconnected")
        except GatewayError as e:
            return _gateway_error(e)
        return JSONResponse(whole_response(replies, finals, n))

    async def _stream(self, runs, replies: list[Reply], include_usage: bool, n: int):
        """The first item of every choice is awaited here: a failure before the first token is an HTTP error, not
        a 200 stream; and from then on the generators are running, so however the response ends their `finally`
        aborts them."""
        try:
            firsts = await _first_items(runs)
        except GatewayError as e:
            return _gateway_error(e)
        return EventSourceResponse(_events(runs, firsts, replies, include_usage, n), ping=15)


def _batch_field(p: int, field: str) -> str:
    """An engine field of prompt p of a completions batch, as its client wrote it."""
    return f"prompt[{p}]" if field in ("prompt", "input_ids") else field_name(field)


async def _all_or_none(awaitables) -> list:
    """Their results, run together; if one fails (or this is cancelled), the others are cancelled first."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # a no-op for those done
        await asyncio.gather(*tasks, return_exceptions=True)


async def _first_items(runs) -> list:
    """The first item of each run; if one fails, every run is closed (aborted) and its error raised."""
    try:
        return await _all_or_none(run.__anext__() for run in runs)
    except BaseException:
        for run in runs:  # those that gave their first item wait at it
            await run.aclose()
        raise


async def _events(runs, firsts, replies: list[Reply], include_usage: bool, n: int = 1):
    """Server-sent events: one chunk per Delta that carries something, of whichever choice it is; each choice's
    chunk with its finish_reason; then the usage of them all (on a chunk of its own with include_usage, else on
    the last finish chunk); [DONE]. An error after the 200 is an event too, and ends every choice."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=4 * len(runs))
    pumps = [asyncio.ensure_future(_pump(i, run, first, queue)) for i, (run, first) in enumerate(zip(runs, firsts))]
    finals: dict[int, Final] = {}
    try:
        while len(finals) < len(runs):
            i, item = await queue.get()
            if isinstance(item, GatewayError):
                yield {"data": json.dumps(error_body(HTTP_STATUS.get(item.code, 500), item.message, item.field))}
                break
            reply = replies[i]
            if isinstance(item, Final):
                finals[i] = item
                chunk = reply.finish_chunk(item)
                if len(finals) == len(runs) and not include_usage:  # every final response carries the usage
                    chunk["usage"] = usage(_in_order(finals), n)
                elif include_usage:
                    chunk["usage"] = None
                yield {"data": json.dumps(chunk)}
            elif reply.carries(item):
                yield {"data": json.dumps(reply.chunk(item))}
        else:
            if include_usage:
                yield {"data": json.dumps(replies[0].usage_chunk(_in_order(finals), n))}
    finally:
        for pump in pumps:  # a choice still running (an error elsewhere, the client gone) is aborted
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
    yield {"data": "[DONE]"}


def _in_order(finals: dict[int, Final]) -> list[Final]:
    return [finals[i] for i in range(len(finals))]


async def _pump(i: int, run, first, queue: asyncio.Queue) -> None:
    """Choice i's items (then its error, if it fails) into the queue, (i, item) each."""
    async with aclosing(run):
        try:
            item = first
            while True:
                await queue.put((i, item))
                if isinstance(item, Final):
                    return
                item = await run.__anext__()
        except GatewayError as e:
            await queue.put((i, e))
        except StopAsyncIteration:
            await queue.put((i, GatewayError(Code.UNAVAILABLE, "the engine stream ended without a final message")))


async def _collect(items, reply: Reply) -> Final:
    async with aclosing(items):
        async for item in items:
            if isinstance(item, Final):
                return item
            reply.add(item)
    raise GatewayError(Code.UNAVAILABLE, "the engine stream ended without a final message")


async def _collect_all(runs, replies: list[Reply]) -> list[Final]:
    """Every choice's Final; if one fails (or this is cancelled), the others are aborted."""
    return await _all_or_none(_collect(run, reply) for run, reply in zip(runs, replies))


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
