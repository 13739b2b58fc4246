"""Per-request sampling parameters, validated at the edge with errors that name the parameter.

Created by the CLI or the gateway from user input, consumed by the scheduler (stop conditions), the sampler
and the output processor (stop strings). `None` for temperature / top_p / top_k means "the model's default"
(its generation_config.json), filled in by `with_defaults` before validation.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from router.request.constraint import Constraint

from router.request.errors import InvalidRequest

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # |bias| at most, as OpenAI's


@dataclass(frozen=True)
class SamplingParams:
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None  # (0, 1]
    top_k: int | None = None  # 0 = off
    min_p: float = 0.0  # [0, 1]
    presence_penalty: float = 0.0  # [-2, 2], OpenAI semantics, over generated tokens
    frequency_penalty: float = 0.0  # [-2, 2]
    repetition_penalty: float = 1.0  # > 0, CTRL/transformers semantics, over prompt and generated tokens
    seed: int | None = None
    max_tokens: int = 64
    min_tokens: int = 0  # stop tokens are suppressed until this many tokens exist
    stop: tuple[str, ...] = ()  # stop strings, matched across token boundaries, excluded from the text
    stop_token_ids: tuple[int, ...] = ()  # stop tokens in addition to the model's EOS set
    ignore_eos: bool = False  # the EOS set does not stop (stop_token_ids still do)
    logprobs: bool = False  # return the sampled token's logprob
    top_logprobs: int = 0  # and this many alternatives (0..20)
    constraint: Constraint | None = None  # structured output (router/request/constraint.py)
    tool_calls: bool = False  # parse the output for Llama 4 tool calls (set from the request's tools)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), ids unique

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def with_defaults(self, defaults: dict[str, Any]) -> SamplingParams:
        """Fill unset temperature/top_p/top_k from generation_config.json-style defaults."""
        do_sample = defaults.get("do_sample", False)
        return replace(
            self,
            temperature=self.temperature
            if self.temperature is not None
            else (float(defaults.get("temperature", 1.0)) if do_sample else 0.0),
            top_p=self.top_p if self.top_p is not None else float(defaults.get("top_p", 1.0) or 1.0),
            top_k=self.top_k if self.top_k is not None else int(defaults.get("top_k", 0) or 0),
        )

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        _check(
            _num(self.temperature) and self.temperature >= 0,
            "temperature",
            f"must be a number >= 0 (0 = greedy), got {self.temperature!r}",
        )
        _check(_num(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(_int(self.top_k) and self.top_k >= 0, "top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _check(_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_num(value) and -2 <= value <= 2, name, f"must be in [-2, 2], got {value!r}")
        _check(
            _num(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            f"must be a number > 0 (1 = off), got {self.repetition_penalty!r}",
        )
        _check(
            _int(self.max_tokens) and self.max_tokens >= 1,
            "max_tokens",
            f"must be an integer >= 1, got {self.max_tokens!r}",
        )
        _check(
            _int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}",
        )
        _check(
            self.seed is None or (_int(self.seed) and 0 <= self.seed < 2**63),
            "seed",
            f"must be an integer in [0, 2**63), got {self.seed!r}",
        )
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings")
        bad = [t for t in self.stop_token_ids if not (_int(t) and 0 <= t < (vocab_size or 2**31))]
        _check(not bad, "stop_token_ids", f"ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        _check(
            _int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
            "top_logprobs",
            f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}",
        )
        _check_logit_bias(self.logit_bias, vocab_size)
        if self.constraint is not None:
            self.constraint.validate()
            _check(self.min_tokens == 0, "min_tokens", "must be 0 with a constraint (the constraint decides the end)")
        return self


def resolve_seed(params: SamplingParams) -> int:
    """The request's seed, or a fresh random one (it then stays with the request, failovers included)."""
    return params.seed if params.seed is not None else secrets.randbelow(2**63)


def logit_bias_from(value: Any, field: str = "logit_bias") -> tuple[tuple[int, float], ...]:
    """A {token id: bias} object as JSON gives it (ids as strings: {"1734": -100}), or a JSON text of one, as
    SamplingParams' logit_bias (sorted by id); InvalidRequest naming `field` otherwise. The range is checked by
    `validate`."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidRequest(field, 'must be a JSON object of token ids to biases, like {"1734": -100}') from None
    if not isinstance(value, dict):
        raise InvalidRequest(field, f'must be an object of token ids to biases, like {{"1734": -100}}, got {value!r}')
    out = {}
    for key, bias in value.items():
        token = key if _int(key) else int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else None
        if token is None:
            raise InvalidRequest(field, f"keys must be token ids (integers), got {key!r}")
        if not _num(bias):
            raise InvalidRequest(field, f"biases must be numbers in [-100, 100], got {bias!r} for token {key}")
        out[token] = float(bias)
    return tuple(sorted(out.items()))


def _check_logit_bias(bias: Any, vocab_size: int | None) -> None:
    ok = isinstance(bias, tuple) and all(isinstance(e, tuple) and len(e) == 2 for e in bias)
    _check(ok, "logit_bias", "must map token ids to biases")
    bad_ids = [t for t, _ in bias if not (_int(t) and 0 <= t < (vocab_size or 2**31))]
    _check(not bad_ids, "logit_bias", f"token ids {bad_ids[:5]} are outside the vocabulary [0, {vocab_size})")
    ids = [t for t, _ in bias]
    _check(len(set(ids)) == len(ids), "logit_bias", "a token id is given twice")
    bad = [(t, b) for t, b in bias if not (_num(b) and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS)]
    _check(not bad, "logit_bias", f"biases must be numbers in [-100, 100], got {dict(bad[:5])}")


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(field, message)
