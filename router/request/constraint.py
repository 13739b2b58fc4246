"""Structured output: a constraint on what a request may generate, checked at the edge and compiled by the engine
(router/engine/grammar.py, with xgrammar) into per-step token masks.

Kinds (one per request, `SamplingParams.constraint`; the proto's `SamplingParams.constraint` oneof):
  json_schema  the output is JSON valid under this JSON schema (given as JSON text)
  json_object  the output is any JSON object
  regex        the output matches this regular expression in full
  grammar      the output is a sentence of this EBNF grammar (xgrammar's GBNF dialect; the start rule is `root`)
  choice       the output is exactly one of these strings
  tool_call    (set by the engine, not by clients) a Llama 4 call of one of these tools, arguments valid under each
               tool's parameters schema (router/request/tools.py)

JSON is generated compactly (no free whitespace), so a schema's output takes as few tokens as it can. Errors name
the field as the proto does (`json_schema`, `regex`, ...; the gateway prefixes `sampling.`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from router.request.errors import InvalidRequest

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice", "tool_call")
MAX_SPEC_CHARS = 64 * 1024  # a larger schema, regex or grammar is refused


@dataclass(frozen=True)
class Constraint:
    kind: str  # one of KINDS
    spec: str = ""  # json_schema / tool_call: JSON text; regex; grammar: EBNF
    choices: tuple[str, ...] = ()  # choice

    @property
    def field(self) -> str:
        return self.kind

    @property
    def key(self) -> str:
        """What the compiled grammar depends on (the engine caches by it)."""
        return json.dumps([self.kind, self.spec, list(self.choices)])

    def validate(self) -> Constraint:
        """Refuse what cannot compile, naming the field; the grammar is parsed (not yet compiled to tokens)."""
        if self.kind not in KINDS:
            raise InvalidRequest("constraint", f"must be one of {list(KINDS)}, got {self.kind!r}")
        if len(self.spec) > MAX_SPEC_CHARS or sum(map(len, self.choices)) > MAX_SPEC_CHARS:
            raise InvalidRequest(self.field, f"is longer than {MAX_SPEC_CHARS} characters")
        if self.kind == "choice":
            if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
                raise InvalidRequest("choice", "give at least one option; every option must be a non-empty string")
        elif self.kind in ("json_schema", "tool_call"):
            _json_object(self.spec, self.field)
        elif self.kind in ("regex", "grammar") and not self.spec:
            raise InvalidRequest(self.field, "is empty")
        try:
            from router.request.grammars import grammar_of  # xgrammar loads only when a constraint comes

            grammar_of(self)
        except (RuntimeError, ValueError, TypeError) as e:
            raise InvalidRequest(self.field, f"does not compile: {_reason(e)}") from None
        return self


def _json_object(text: str, field: str) -> dict:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise InvalidRequest(field, f"is not valid JSON: {e}") from None
    if not isinstance(value, (dict, list)):
        raise InvalidRequest(field, f"must be a JSON object, got {type(value).__name__}")
    return value


def _reason(e: Exception) -> str:
    """xgrammar's message without its source-location prefix."""
    text = str(e).strip()
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text
