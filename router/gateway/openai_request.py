"""OpenAI request bodies (POST /v1/completions, /v1/chat/completions) -> the engine's `EngineRequest`. No I/O.

Every body key this server reads is in one of the tables below, so accepting a new one is one line: a sampling
setting is in `SAMPLING` (body key -> SamplingParams field; SamplingParams.validate checks its value and the error
names the body key), a key this server refuses in `REFUSED`. `SAMPLING` holds every scalar sampling parameter of the
wire contract (protos/vocabulary.py) under its own name, so one added to the proto is taken here too; our extras
(top_k, min_p, min_tokens, repetition_penalty, ignore_eos, stop_token_ids) go at the top level of the body, as vLLM
takes them (the openai SDK's `extra_body`). `tools`, `tool_choice` and `response_format` (or vLLM's `guided_*`) are
translated in openai_tools.py. Keys in neither table are ignored, as OpenAI-compatible servers do
(`user`, `metadata`, `store`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from protos.vocabulary import SAMPLING_FIELDS
from router.gateway.openai_tools import constraint_of, tool_calls_of, tool_choice_of, tools_of
from router.gateway.openai_tools import field_name as tool_field_name
from router.images.data_url import data_url_bytes
from router.request.errors import InvalidRequest
from router.request.messages import ChatMessage, EngineRequest, ImagePart
from router.request.sampling_params import SamplingParams, logit_bias_from

# body key -> SamplingParams field, shared by both endpoints; `stop` and the logprobs keys are read on their own
# (their OpenAI shapes differ from ours: a string or a list; completions' `logprobs` is a count)
OWN_SHAPE = ("stop", "logprobs", "top_logprobs", "logit_bias")
SAMPLING = {
    **{f.name: f.name for f in SAMPLING_FIELDS if f.name not in OWN_SHAPE},
    "max_completion_tokens": "max_tokens",  # the chat API's newer name; wins over max_tokens
}
CHAT_ONLY = {"top_logprobs": "top_logprobs"}
# body key -> why it is refused
REFUSED = {
    "functions": "function calls are not supported by this server",
    "function_call": "function calls are not supported by this server",
    "suffix": "is not supported by this server",
}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "ipython"}


@dataclass(frozen=True)
class OpenAIRequest:
    """What the front needs besides the engine request."""

    engine: EngineRequest
    model: str
    stream: bool
    include_usage: bool
    n: int = 1  # choices: each an independent generation of the same prompt
    more: tuple[EngineRequest, ...] = ()  # a completions batch: the prompts after the first

    @property
    def engines(self) -> tuple[EngineRequest, ...]:
        """One per prompt (request ids `<id>-<p>` in a batch of several)."""
        return (self.engine, *self.more)


def completion_request(body: dict, request_id: str) -> OpenAIRequest:
    """POST /v1/completions: `prompt`: a string or a list of token ids, or a batch of either (a list of them)."""
    _check_common(body)
    for key in ("tools", "tool_choice"):
        if body.get(key) not in (None, []):
            raise InvalidRequest(key, "tools are offered in chat completions (POST /v1/chat/completions)")
    if body.get("echo"):
        raise InvalidRequest("echo", "is not supported by this server (the prompt is never repeated)")
    if body.get("best_of") not in (None, 1):
        raise InvalidRequest("best_of", f"only 1 is supported, got {body['best_of']!r}")
    extra = {}
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if not isinstance(logprobs, int) or isinstance(logprobs, bool):
            raise InvalidRequest("logprobs", f"must be an integer (how many alternatives), got {logprobs!r}")
        extra = {"logprobs": True, "top_logprobs": logprobs}
    params = sampling_params(body, extra)
    prompts = _prompts(body.get("prompt"))
    engines = [
        EngineRequest(
            request_id if len(prompts) == 1 else f"{request_id}-{p}",
            params,
            **({"prompt": prompt} if isinstance(prompt, str) else {"prompt_ids": prompt}),
        )
        for p, prompt in enumerate(prompts)
    ]
    return _request(body, *engines)


def _prompts(prompt) -> list[str | tuple[int, ...]]:
    """A prompt (a string or token ids) or a batch of them, as a list of prompts."""
    if isinstance(prompt, str) or _ids(prompt):
        return [prompt if isinstance(prompt, str) else tuple(prompt)]
    if isinstance(prompt, list) and prompt:
        for p, one in enumerate(prompt):
            if not (isinstance(one, str) or _ids(one)):
                raise InvalidRequest(f"prompt[{p}]", f"must be a string or a list of token ids, got {one!r}")
        return [one if isinstance(one, str) else tuple(one) for one in prompt]
    raise InvalidRequest("prompt", "must be a string or a list of token ids, or a non-empty list of either")


def _ids(value) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def chat_request(body: dict, request_id: str) -> OpenAIRequest:
    """POST /v1/chat/completions: `messages`, each content a string or a list of text and image_url parts."""
    _check_common(body)
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise InvalidRequest("logprobs", f"must be true or false, got {logprobs!r}")
    params = sampling_params(body, {"logprobs": logprobs}, CHAT_ONLY)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of {role, content} objects")
    chat = tuple(_message(f"messages[{i}]", m) for i, m in enumerate(messages))
    engine = EngineRequest(request_id, params, messages=chat, tools=tools_of(body), tool_choice=tool_choice_of(body))
    return _request(body, engine)


def sampling_params(body: dict, extra: dict, more: dict | None = None) -> SamplingParams:
    """The body's sampling keys (as given: SamplingParams.validate checks them later, naming the key)."""
    given = dict(extra)
    for key, name in {**SAMPLING, **(more or {})}.items():
        if body.get(key) is not None and not (key == "max_tokens" and body.get("max_completion_tokens") is not None):
            given[name] = body[key]
    stop = body.get("stop")
    if stop is not None:
        given["stop"] = (stop,) if isinstance(stop, str) else stop
        if not isinstance(given["stop"], list | tuple) or not all(isinstance(s, str) for s in given["stop"]):
            raise InvalidRequest("stop", f"must be a string or a list of strings, got {stop!r}")
        given["stop"] = tuple(given["stop"])
    if body.get("logit_bias") is not None:  # {"<token id>": bias}: JSON's keys are strings
        given["logit_bias"] = logit_bias_from(body["logit_bias"])
    constraint = constraint_of(body)
    if constraint is not None:
        given["constraint"] = constraint
    if "stop_token_ids" in given:
        if not isinstance(given["stop_token_ids"], list):
            raise InvalidRequest("stop_token_ids", "must be a list of token ids")
        given["stop_token_ids"] = tuple(given["stop_token_ids"])
    return SamplingParams(**given)


def field_name(field: str) -> str:
    """An engine field as this front's client wrote it: the body key of a sampling setting, a message's parts."""
    if field == "max_tokens":
        return "max_tokens (or max_completion_tokens)"
    return tool_field_name(field).replace(".parts[", ".content[")


def _check_common(body: dict) -> None:
    for key, why in REFUSED.items():
        if body.get(key) not in (None, [], {}):
            raise InvalidRequest(key, why)
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise InvalidRequest("n", f"must be an integer >= 1 (how many choices), got {n!r}")
    if not isinstance(body.get("stream", False), bool):
        raise InvalidRequest("stream", f"must be true or false, got {body['stream']!r}")
    options = body.get("stream_options")
    if options is not None and (
        not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)
    ):
        raise InvalidRequest("stream_options", 'must be an object like {"include_usage": true}')


def _request(body: dict, *engines: EngineRequest) -> OpenAIRequest:
    salt = body.get("cache_salt")  # vLLM's key: requests with different salts share no cached KV
    if salt is not None:
        if not isinstance(salt, str):
            raise InvalidRequest("cache_salt", f"must be a string, got {salt!r}")
        engines = tuple(replace(engine, cache_salt=salt or None) for engine in engines)
    model = body.get("model", "")
    if not isinstance(model, str):
        raise InvalidRequest("model", f"must be a string, got {model!r}")
    options = body.get("stream_options") or {}
    stream, include_usage = bool(body.get("stream", False)), bool(options.get("include_usage", False))
    return OpenAIRequest(engines[0], model, stream, include_usage, body.get("n") or 1, tuple(engines[1:]))


def _message(field: str, m) -> ChatMessage:
    if not isinstance(m, dict):
        raise InvalidRequest(field, "must be an object with role and content")
    role = m.get("role")
    if role not in CHAT_ROLES:
        raise InvalidRequest(f"{field}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
    content = m.get("content")
    if content is None:
        content = ""
    calls = tool_calls_of(field, m) if role == "assistant" else ()
    if isinstance(content, str):
        return ChatMessage(CHAT_ROLES[role], content, calls)
    if not isinstance(content, list):
        raise InvalidRequest(f"{field}.content", "must be a string or a list of content parts")
    parts = tuple(_part(f"{field}.content[{j}]", p) for j, p in enumerate(content))
    return ChatMessage(CHAT_ROLES[role], parts, calls)


def _part(field: str, part) -> str | ImagePart:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise InvalidRequest(f"{field}.image_url", 'must be {"url": "data:image/...;base64,..."}')
        return ImagePart(data_url_bytes(url, f"{field}.image_url.url"))
    raise InvalidRequest(field, 'must be {"type": "text", "text": ...} or {"type": "image_url", ...}')
