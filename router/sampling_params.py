"""Per-request sampling parameters, validated at the edge with errors that name the parameter.

Created by the CLI or the gateway from user input, consumed by the sampler and the generation loop. `None`
for temperature / top_p / top_k means "the model's default" (its generation_config.json), filled in by
`with_defaults` before validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any


class InvalidRequest(ValueError):
    """A request the engine cannot run; the message names the offending field and what is allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None  # (0, 1]
    top_k: int | None = None  # 0 = off
    min_p: float = 0.0  # [0, 1]
    seed: int | None = None
    max_tokens: int = 64
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's EOS set
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_defaults(self, defaults: dict[str, Any]) -> "SamplingParams":
        """Fill unset temperature/top_p/top_k from generation_config.json-style defaults."""
        do_sample = defaults.get("do_sample", False)
        return replace(
            self,
            temperature=self.temperature if self.temperature is not None else (
                float(defaults.get("temperature", 1.0)) if do_sample else 0.0),
            top_p=self.top_p if self.top_p is not None else float(defaults.get("top_p", 1.0) or 1.0),
            top_k=self.top_k if self.top_k is not None else int(defaults.get("top_k", 0) or 0),
        )

    def validate(self) -> "SamplingParams":
        _check(self.temperature is not None and _finite(self.temperature) and self.temperature >= 0,
               "temperature", f"must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        _check(self.top_p is not None and _finite(self.top_p) and 0 < self.top_p <= 1,
               "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
               "seed", f"must be an integer in [0, 2**63), got {self.seed!r}")
        return self


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(field, message)
