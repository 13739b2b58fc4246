"""The engine's Deltas and Final -> OpenAI response objects (completions and chat completions, whole or as stream
chunks), and errors in OpenAI's JSON shape with their HTTP status. No I/O.

A stream: one chunk per Delta (the first chat chunk also carries `role: assistant`), a last chunk with the
finish_reason (and `usage`, unless the request asked for it on a chunk of its own), then, with
`stream_options.include_usage`, a chunk with empty `choices` and the `usage`; the front then sends `data: [DONE]`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from router.gateway.openai_tools import openai_tool_call
from router.request.messages import Delta, Final, TokenLogprob
from router.request.tokenizer import Tokenizer
from router.request.tools import ToolCallPart

Code = grpc.StatusCode
HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.FAILED_PRECONDITION: 400,
    Code.OUT_OF_RANGE: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.CANCELLED: 499,
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    kind = ERROR_TYPE.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param or None, "code": code or kind}}


@dataclass
class Reply:
    """One request's answer, built up as its Deltas arrive. `chat`: chat.completion(.chunk), else text_completion."""

    chat: bool
    request_id: str
    model: str
    tokenizer: Tokenizer | None
    created: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    want_logprobs: bool = False
    chunks_sent: int = 0
    tool_calls: list[dict] = field(default_factory=list)  # the output's calls, OpenAI's shape
    index: int = 0  # which choice this is (OpenAI's `n`)
    parted: set[int] = field(default_factory=set)  # calls streamed in parts (their whole form is not sent again)

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def add(self, delta: Delta) -> None:
        self.text.append(delta.text)
        self.logprobs.extend(delta.logprobs)
        self._calls(delta)

    def _calls(self, delta: Delta) -> list[dict]:
        """The delta's tool calls, numbered on from those before (OpenAI's `index`)."""
        new = [openai_tool_call(c, len(self.tool_calls) + i) for i, c in enumerate(delta.tool_calls)]
        self.tool_calls += new
        return new

    def whole(self, final: Final) -> dict:
        """The non-streamed response (of this choice alone)."""
        return {**self.head(self.object), "choices": [self.choice(final)], "usage": usage([final])}

    def choice(self, final: Final) -> dict:
        """This choice in a non-streamed response."""
        text = "".join(self.text)
        logprobs = self._logprobs(self.logprobs)
        if self.chat:
            message = {"role": "assistant", "content": text if text or not self.tool_calls else None}
            if self.tool_calls:
                message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in self.tool_calls]
            choice = {"index": self.index, "message": message, "logprobs": logprobs}
        else:
            choice = {"index": self.index, "text": text, "logprobs": logprobs}
        choice["finish_reason"] = final.finish_reason.value
        return choice

    def carries(self, delta: Delta) -> bool:
        """Whether a Delta makes a chunk: one with text, calls or (when asked for) logprobs, and the first of a chat
        (it names the role). A Delta whose tokens' text is held back (a possible tool call, a stop string, an
        incomplete character) has nothing an OpenAI client could read."""
        return bool(
            delta.text
            or delta.tool_calls
            or delta.tool_call_parts
            or (self.want_logprobs and delta.logprobs)
            or (self.chat and not self.chunks_sent)
        )

    def chunk(self, delta: Delta) -> dict:
        """One stream chunk for a Delta."""
        self.chunks_sent += 1
        out = self._chunk_with(delta.text, self._logprobs(list(delta.logprobs)), None)
        parts = [openai_call_part(p) for p in delta.tool_call_parts]
        self.parted.update(p.index for p in delta.tool_call_parts)
        calls = parts + [c for c in self._calls(delta) if c["index"] not in self.parted]
        if calls and self.chat:
            out["choices"][0]["delta"]["tool_calls"] = calls
        return out

    def finish_chunk(self, final: Final) -> dict:
        """This choice's chunk with its finish_reason."""
        return self._chunk_with("", None, final.finish_reason.value)

    def usage_chunk(self, finals: list[Final], n: int = 1) -> dict:
        """The chunk of stream_options.include_usage: no choices, the usage of them all."""
        return {**self.head(self.object + ".chunk" if self.chat else self.object), "choices": [],
                "usage": usage(finals, n)}  # fmt: skip

    def _chunk_with(self, text: str, logprobs, finish_reason: str | None) -> dict:
        if self.chat:
            delta = {"content": text}
            if self.chunks_sent <= 1 and finish_reason is None:
                delta["role"] = "assistant"
            choice = {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return {**self.head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self.head("text_completion"), "choices": [choice]}

    def head(self, kind: str) -> dict:
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model}

    def _logprobs(self, items: list[TokenLogprob]) -> dict | None:
        if not self.want_logprobs:
            return None
        if self.chat:
            return {"content": [self._chat_logprob(lp) for lp in items]}
        return {
            "tokens": [self._token(lp.token_id) for lp in items],
            "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [{self._token(t): v for t, v in lp.top} for lp in items],
        }

    def _chat_logprob(self, lp: TokenLogprob) -> dict:
        token = self._token(lp.token_id)
        top = [{"token": self._token(t), "logprob": v, "bytes": list(self._token(t).encode())} for t, v in lp.top]
        return {"token": token, "logprob": lp.logprob, "bytes": list(token.encode()), "top_logprobs": top}

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else f"<{token_id}>"


def openai_call_part(part: ToolCallPart) -> dict:
    """A streamed piece of a call, as OpenAI's deltas carry them: the first with the id, type and name."""
    if part.name:
        return {"index": part.index, "id": part.id, "type": "function",
                "function": {"name": part.name, "arguments": part.arguments}}  # fmt: skip
    return {"index": part.index, "function": {"arguments": part.arguments}}


def usage(finals: list[Final], n: int = 1) -> dict:
    """Of the choices' Finals, n per prompt in prompt order: OpenAI counts each prompt once (its cached tokens are
    its first choice's)."""
    prompt = sum(f.prompt_tokens for f in finals[::n])
    completion = sum(f.completion_tokens for f in finals)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(f.cached_tokens for f in finals[::n])},  # from the prefix cache
    }


def whole_response(replies: list[Reply], finals: list[Final], n: int = 1) -> dict:
    """The non-streamed response of every choice (n per prompt)."""
    choices = [reply.choice(final) for reply, final in zip(replies, finals)]
    return {**replies[0].head(replies[0].object), "choices": choices, "usage": usage(finals, n)}
