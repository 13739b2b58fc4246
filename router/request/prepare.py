"""Turns an `EngineRequest` into prompt token ids (each image's tokens in place) and complete, validated sampling
parameters.

Used by the gateway (to answer INVALID_ARGUMENT before a stream starts) and by the engine (which never
trusts its caller). Every failure is an `InvalidRequest` naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from cluster.config import ModelConfig
from router.request.chat import chat_images, render_chat
from router.request.constraint import Constraint
from router.request.errors import InvalidRequest
from router.request.messages import EngineRequest, ImageInput, Resume
from router.request.sampling_params import SamplingParams
from router.request.tokenizer import Tokenizer
from router.request.tools import CHOICES, check_tools

if TYPE_CHECKING:  # torch-free at import: the command line checks prompts before loading torch
    from router.images.request import VisionPrompt

NO_VISION = "this model does not take images (its checkpoint has no vision tower); send text only"


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_model_len: int  # positions one sequence may reach
    kv_tokens_alone: int  # the most tokens one sequence can keep in the KV cache with it all to itself


@dataclass(frozen=True)
class PreparedRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    resume: Resume | None = None
    images: tuple[ImageInput, ...] = ()  # in prompt order, each with its grid; prompt_ids hold their tokens
    cache_salt: str | None = None


def prepare_request(
    req: EngineRequest,
    tokenizer: Tokenizer | None,
    defaults: dict[str, Any],
    limits: Limits,
    vision: VisionPrompt | None = None,
) -> PreparedRequest:
    if not isinstance(req.request_id, str) or not req.request_id:
        raise InvalidRequest("request_id", "must be a non-empty string")
    given = [
        name
        for name, v in (("prompt", req.prompt), ("input_ids", req.prompt_ids), ("messages", req.messages))
        if v is not None
    ]
    if len(given) != 1:
        raise InvalidRequest("prompt", f"give exactly one of prompt, input_ids or messages (got {given or 'none'})")
    ids, images = prompt_with_images(req, tokenizer, vision, given[0])
    check_token_ids(ids, limits.vocab_size, given[0], "input_ids")
    params = with_tools(req, req.params).with_defaults(defaults).validate(limits.vocab_size)
    check_length(len(ids), params.max_tokens, limits, given[0])
    if req.resume is not None:
        check_resume(req.resume, params, limits)
    check_cache_salt(req.cache_salt)
    return PreparedRequest(req.request_id, tuple(ids), params, req.resume, images, req.cache_salt or None)


def prompt_with_images(
    req: EngineRequest, tokenizer: Tokenizer | None, vision: VisionPrompt | None, field: str
) -> tuple[list[int], tuple[ImageInput, ...]]:
    """The prompt's token ids with every image's tokens in place, and its images (with their grids)."""
    ids, images = _prompt_ids(req, tokenizer), request_images(req)
    if not images:
        return ids, ()
    if vision is None:
        raise InvalidRequest(images[0].field, NO_VISION)
    return vision.expand(ids, images, field)


def with_tools(req: EngineRequest, params: SamplingParams) -> SamplingParams:
    """The request's tool choice in its sampling parameters: parse calls (unless `none`), and constrain decoding to a
    call for `required` or a named tool."""
    if not req.tools and req.tool_choice == "auto":
        return params
    if req.messages is None:
        raise InvalidRequest("tools", "tools are offered in a chat; send messages, not a prompt or input_ids")
    tools = check_tools(req.tools, req.tool_choice)
    if req.tool_choice == "none":
        return params
    if req.tool_choice == "auto":
        return replace(params, tool_calls=True)
    if params.constraint is not None:
        raise InvalidRequest("tool_choice", f"{req.tool_choice!r} constrains the output; drop the sampling constraint")
    chosen = tools if req.tool_choice in CHOICES else [t for t in tools if t["name"] == req.tool_choice]
    return replace(params, tool_calls=True, constraint=Constraint("tool_call", json.dumps(chosen)))


def request_images(req: EngineRequest) -> tuple[ImageInput, ...]:
    """A request's images in prompt order: a chat's image parts, or those given beside a prompt."""
    if req.messages is not None and req.images:
        raise InvalidRequest(req.images[0].field, "a chat's images go in its messages' parts, not beside them")
    return tuple(chat_images(req.messages)) if req.messages is not None else tuple(req.images)


def check_resume(resume: Resume, params: SamplingParams, limits: Limits) -> None:
    if resume.output_ids:
        check_token_ids(resume.output_ids, limits.vocab_size, "resume", "resume.output_ids")
    if len(resume.output_ids) >= params.max_tokens:
        raise InvalidRequest(
            "resume.output_ids",
            f"{len(resume.output_ids)} tokens already streamed; nothing is left of max_tokens ({params.max_tokens})",
        )
    if resume.text_chars < 0:
        raise InvalidRequest("resume.text_chars", f"must be >= 0, got {resume.text_chars}")
    if resume.tool_parts < 0:
        raise InvalidRequest("resume.tool_parts", f"must be >= 0, got {resume.tool_parts}")


MAX_CACHE_SALT_CHARS = 1024


def check_cache_salt(salt) -> None:
    if salt is None:
        return
    if not isinstance(salt, str):
        raise InvalidRequest("cache_salt", f"must be a string, got {type(salt).__name__}")
    if len(salt) > MAX_CACHE_SALT_CHARS:
        raise InvalidRequest("cache_salt", f"is {len(salt)} characters; at most {MAX_CACHE_SALT_CHARS}")


def check_token_ids(ids, vocab_size: int, field: str, ids_field: str) -> None:
    if not ids:
        raise InvalidRequest(field, "is empty; give at least one token")
    bad = [t for t in ids if not (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size)]
    if bad:
        raise InvalidRequest(ids_field, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")


def check_length(prompt_len: int, max_tokens: int, limits: Limits, field: str) -> None:
    if prompt_len >= limits.max_model_len:
        raise InvalidRequest(field, f"is {prompt_len} tokens; the context length is {limits.max_model_len}")
    total = prompt_len + max_tokens
    if total > limits.max_model_len:
        raise InvalidRequest(
            "max_tokens",
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds "
            f"the context length {limits.max_model_len}; lower max_tokens to at most "
            f"{limits.max_model_len - prompt_len}",
        )
    if total > limits.kv_tokens_alone:
        raise InvalidRequest(
            "max_tokens",
            f"prompt + max_tokens = {total} tokens, but the KV cache holds "
            f"{limits.kv_tokens_alone} tokens for one sequence",
        )


def _prompt_ids(req: EngineRequest, tokenizer: Tokenizer | None) -> list[int]:
    if req.prompt_ids is not None:
        return list(req.prompt_ids)
    field = "prompt" if req.prompt is not None else "messages"
    if tokenizer is None:
        raise InvalidRequest(field, "this model has no tokenizer.json; send input_ids")
    if req.prompt is not None:
        if not isinstance(req.prompt, str):
            raise InvalidRequest("prompt", "must be a string")
        return tokenizer.encode(req.prompt) if req.prompt else []
    tools = check_tools(req.tools, req.tool_choice) if req.tools else None
    return tokenizer.encode(render_chat(req.messages, tools), add_special_tokens=False)


def check_prompt(cfg: ModelConfig, prompt_ids: list[int], max_tokens: int) -> None:
    """The request checks that need only config.json (the engine adds its KV-cache limit)."""
    check_token_ids(prompt_ids, cfg.vocab_size, "prompt", "prompt_ids")
    check_length(len(prompt_ids), max_tokens, Limits(cfg.vocab_size, cfg.max_position_embeddings, 2**62), "prompt")
