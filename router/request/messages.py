"""What crosses the gateway <-> engine boundary. The gateway (or the CLI) creates `EngineRequest`s; the
engine answers each with a stream of `Delta`s and exactly one `Final`. Deltas carry only what is new.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from router.request.sampling_params import SamplingParams
from router.request.tools import Tool, ToolCall, ToolCallPart


@dataclass(frozen=True)
class ImagePart:
    """An image inside a chat message: the encoded file's bytes as the client sent them (PNG, JPEG, WebP or GIF; a
    data: URL is decoded to bytes at the edge). Rendered as `<|image|>`, then expanded to the image's tokens."""

    data: bytes


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant | ipython (a tool's result; `tool` is taken as ipython)
    content: str | tuple[str | ImagePart, ...]  # text, or text and image parts in order
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's calls, rendered after its text


@dataclass(frozen=True)
class ImageInput:
    """One image of a request, with the request field it came from (named by every error about it).

    `grid` None: the prompt still holds the image's `<|image|>` placeholder, which `prepare_request` expands.
    `grid` (rows, cols): the prompt ids already hold the image's expanded tokens; a request relayed by the gateway
    (or resumed on another router) carries its images this way, so no router re-tokenizes or re-expands."""

    data: bytes
    field: str
    grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class Resume:
    """A request continued on another router after its first one died: the tokens already streamed to the client
    (generated, not part of the prompt) and how many characters of their text the client already has. The
    engine recomputes their KV, rebuilds the text stream (so a stop string spanning the failover still matches)
    and samples on from there; sampling is a pure function of (seed, position), so with the same seed the
    continuation is the undisturbed run's."""

    output_ids: tuple[int, ...]
    text_chars: int
    tool_parts: int = 0  # how many streamed tool call parts the client already has


@dataclass(frozen=True)
class EngineRequest:
    """Exactly one of prompt / prompt_ids / messages is set (checked by `prepare_request`)."""

    request_id: str
    params: SamplingParams
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    resume: Resume | None = None
    images: tuple[ImageInput, ...] = ()  # with prompt / prompt_ids (a chat's images are parts of its messages)
    cache_salt: str | None = None  # requests with different salts share no cached KV (tenant isolation)
    tools: tuple[Tool, ...] = ()  # offered to the model in the chat's system message (router/request/tools.py)
    tool_choice: str = "auto"  # auto | none | required | a tool's name


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the top-n alternatives (token id, logprob), best first


@dataclass(frozen=True)
class Delta:
    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()  # calls parsed from the output, each whole, in order (ids unique)
    # calls as they are written, when decoding is constrained to a call (router/request/tool_stream.py)
    tool_call_parts: tuple[ToolCallPart, ...] = ()


class WireName(str, Enum):
    """An enum whose members are their wire names wherever text is made of them (f-strings, logs, metric labels,
    JSON), as Python 3.11's StrEnum does; Python 3.10 has no StrEnum."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class FinishReason(WireName):
    """How a request ended; the values are the wire contract's names (FINISH_REASON_<NAME> in the proto)."""

    LENGTH = "length"  # max_tokens or the context length
    STOP = "stop"  # a stop token or stop string
    ABORT = "abort"  # the client cancelled, its deadline passed, or the server shut down
    ERROR = "error"  # see Final.error_kind
    TOOL_CALLS = "tool_calls"  # the output was tool calls (sent whole in the deltas)


class ErrorKind(WireName):
    """Whose fault an error is, which decides what the gateway does with it."""

    REQUEST = "request"  # bad input: INVALID_ARGUMENT naming the field, never retried
    CLUSTER = "cluster"  # the workers or encoders are gone: UNAVAILABLE
    INTERNAL = "internal"  # the router's step raised: the gateway moves the stream to another router


@dataclass(frozen=True)
class Final:
    request_id: str
    finish_reason: FinishReason
    matched_stop: str | int | None = None  # the stop string or stop token id that ended it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # for FinishReason.ERROR: what went wrong, naming the field if it was the request
    error_kind: ErrorKind | None = None  # for FinishReason.ERROR
    error_field: str | None = None  # for ErrorKind.REQUEST: the request field at fault
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache at admission (OpenAI's usage field)


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_bytes_per_token: int = 0
    kv_token_capacity: int = 0
    tokens_per_s: float = 0.0
    finished: dict[str, int] = field(default_factory=dict)
    prefix_caching: bool = False
    prompt_tokens: int = 0  # of the requests admitted so far (a resumed request's streamed tokens included)
    cached_tokens: int = 0  # of those, served from the prefix cache
    cached_blocks: int = 0  # KV blocks named by a hash (both pools), held or not
    evictions: int = 0  # cached blocks taken for new content

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / prompt tokens."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
