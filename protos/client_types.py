"""What the client libraries (protos/client.py, protos/async_client.py) share: request building, the result
types they hand back, and how a Generate stream folds into one result. Over the generated stubs only: no
engine, torch or Ray imports, so any Python process can use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from protos.moecluster.v1 import inference_pb2 as pb
from protos.vocabulary import FINISH_REASON_NAMES, SAMPLING_NAMES

READINESS = "moecluster.v1.Inference"  # the grpc.health.v1 name that is SERVING when generations can run
SAMPLING_FIELDS = SAMPLING_NAMES  # the names `generate` takes as keywords
FINISH_REASONS = FINISH_REASON_NAMES


class GenerationError(Exception):
    """An RPC that ended with a non-OK status. `code` is a grpc.StatusCode; `field` names the request field
    at fault when the server said which."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = ""):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.field = code, message, field

    @classmethod
    def from_rpc(cls, error: grpc.RpcError, field: str = "") -> GenerationError:
        return cls(error.code(), error.details() or "", field)


@dataclass(frozen=True)
class Chunk:
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[pb.TokenLogprob, ...] = ()
    tool_calls: tuple[pb.ToolCall, ...] = ()  # whole calls (in the last chunk)
    tool_call_parts: tuple[pb.ToolCallPart, ...] = ()  # calls as they are written (a constrained tool choice)


@dataclass
class GenerationResult:
    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""  # length | stop | abort | tool_calls
    matched_stop: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the router's prefix cache
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    tool_calls: list[pb.ToolCall] = field(default_factory=list)  # the output's tool calls (name, JSON arguments)


def build_request(
    prompt: str | None = None,
    *,
    input_ids: Iterable[int] | None = None,
    messages: Iterable | None = None,
    request_id: str = "",
    model: str = "",
    stream: bool = True,
    images: Iterable | None = None,
    cache_salt: str = "",
    tools: Iterable | None = None,
    tool_choice: str = "",
    **sampling,
) -> pb.GenerateRequest:
    """Exactly one of prompt / input_ids / messages (`(role, content)` pairs or {"role", "content"} dicts, the
    content a string or a list of parts: see `content_part`); sampling keywords are SamplingParams' fields (unset =
    the model's default). `images` go with a prompt or input_ids, one per `<|image|>` in it (see `image`). Requests
    with different `cache_salt`s share no cached KV. With messages, `tools` ({"name", "description", "parameters":
    a JSON schema, as a dict or JSON text}, or pb.Tool) and `tool_choice` ("auto", "none", "required" or a tool's
    name; empty: auto)."""
    unknown = sorted(set(sampling) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling parameters {unknown}; allowed: {', '.join(SAMPLING_FIELDS)}")
    if sampling.get("logit_bias") is not None:  # {token id: bias}, or (id, bias) pairs as SamplingParams holds them
        sampling["logit_bias"] = dict(sampling["logit_bias"])
    req = pb.GenerateRequest(
        request_id=request_id,
        model=model,
        stream=stream,
        cache_salt=cache_salt,
        sampling=pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None}),
    )
    if prompt is not None:
        req.prompt = prompt
    if input_ids is not None:
        req.input_ids.SetInParent()  # set even when empty, so the server names the empty field
        req.input_ids.ids.extend(input_ids)
    if messages is not None:
        req.messages.SetInParent()
        req.messages.CopyFrom(chat_messages(messages))
    req.images.extend(image(x) for x in images or ())
    req.tools.extend(_tool(t) for t in tools or ())
    if tool_choice in ("auto", "none", "required"):
        req.tool_choice.mode = tool_choice
    elif tool_choice:
        req.tool_choice.function = tool_choice
    return req


def _tool(tool) -> pb.Tool:
    if isinstance(tool, pb.Tool):
        return tool
    parameters = tool.get("parameters", "")
    if not isinstance(parameters, str):
        parameters = json.dumps(parameters)
    return pb.Tool(name=tool["name"], description=tool.get("description", ""), parameters=parameters)


def chat_messages(messages: Iterable) -> pb.ChatMessages:
    out = pb.ChatMessages()
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
        if isinstance(content, str):
            out.messages.add(role=role, content=content)
        else:
            out.messages.add(role=role, parts=[content_part(p) for p in content])
    return out


def content_part(part) -> pb.ContentPart:
    """A message part: text (a str, or {"type": "text", "text": ...}) or an image (bytes, or {"type": "image", and
    one of "data": bytes, "path": a file, "url": a data: URL})."""
    if isinstance(part, str):
        return pb.ContentPart(text=part)
    if isinstance(part, (bytes, bytearray)):
        return pb.ContentPart(image=pb.Image(data=bytes(part)))
    if isinstance(part, Mapping) and part.get("type") == "text":
        return pb.ContentPart(text=part["text"])
    if isinstance(part, Mapping) and part.get("type") == "image":
        given = [k for k in ("data", "path", "url") if k in part]
        if len(given) != 1:
            raise TypeError(f"an image part needs exactly one of data, path or url, got {sorted(part)}")
        key = given[0]
        if key == "url":
            return pb.ContentPart(image=pb.Image(url=part["url"]))
        return pb.ContentPart(image=image(Path(part["path"]) if key == "path" else part["data"]))
    raise TypeError(f'a message part is text or an image ({{"type": "text" | "image", ...}}), got {part!r}')


def image(source) -> pb.Image:
    """An image from its bytes, a file path (str or Path), or a data: URL (a str starting with "data:")."""
    if isinstance(source, (bytes, bytearray)):
        return pb.Image(data=bytes(source))
    if isinstance(source, str) and source.startswith("data:"):
        return pb.Image(url=source)
    if isinstance(source, (str, os.PathLike)):
        return pb.Image(data=Path(source).read_bytes())
    raise TypeError(f"an image is bytes, a file path or a data: URL, got {type(source).__name__}")


def tokenize_request(
    prompt: str | None = None,
    messages: Iterable | None = None,
    add_special_tokens: bool = True,
    images: Iterable | None = None,
) -> pb.TokenizeRequest:
    """Exactly one of prompt (with its `images`, one per `<|image|>`) or messages (as for `build_request`)."""
    if (prompt is None) == (messages is None):
        raise TypeError("give exactly one of prompt or messages")
    if prompt is not None:
        return pb.TokenizeRequest(
            prompt=prompt, add_special_tokens=add_special_tokens, images=[image(x) for x in images or ()]
        )
    return pb.TokenizeRequest(messages=chat_messages(messages))


class StreamFolder:
    """Folds GenerateResponses into chunks (returned by `add`) and one GenerationResult."""

    def __init__(self):
        self.result = GenerationResult()
        self.error: pb.Error | None = None
        self.done = False

    def add(self, response: pb.GenerateResponse) -> Chunk | None:
        r = self.result
        r.request_id = response.request_id
        kind = response.WhichOneof("kind")
        if kind == "chunk":
            c = response.chunk
            r.token_ids += c.token_ids
            r.text += c.text
            r.logprobs += c.logprobs
            return Chunk(tuple(c.token_ids), c.text, tuple(c.logprobs), tuple(c.tool_calls), tuple(c.tool_call_parts))
        if kind == "complete":
            c = response.complete
            r.finish_reason = FINISH_REASONS.get(c.finish_reason, str(c.finish_reason))
            stop = c.WhichOneof("matched_stop")
            r.matched_stop = getattr(c, stop) if stop else None
            r.prompt_tokens, r.completion_tokens = c.prompt_tokens, c.completion_tokens
            r.cached_tokens = c.cached_tokens
            r.tool_calls = list(c.tool_calls)
            self.done = True
        elif kind == "error":
            self.error = response.error
        return None

    def failure(self, error: grpc.RpcError) -> GenerationError:
        return GenerationError.from_rpc(error, self.error.field if self.error else "")
