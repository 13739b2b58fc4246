"""xgrammar Grammars of the output constraints (router/request/constraint.py) and of Llama 4 tool calls. No
tokenizer here: the gateway builds them to refuse a constraint that does not compile before a stream starts, and
the engine (router/engine/grammar.py) compiles them against its tokenizer. xgrammar is imported where it is used,
so the command line stays light.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.request.constraint import Constraint


def grammar_of(constraint: Constraint):
    """The xgrammar Grammar of a constraint (tokenizer-independent); raises on a bad spec."""
    import xgrammar as xgr

    kind = constraint.kind
    if kind == "json_schema":
        return json_schema_grammar(constraint.spec)
    if kind == "json_object":
        return json_schema_grammar('{"type": "object"}')
    if kind == "regex":
        return xgr.Grammar.from_regex(constraint.spec)
    if kind == "grammar":
        return xgr.Grammar.from_ebnf(constraint.spec)
    if kind == "choice":
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in constraint.choices))
    return call_grammar(json.loads(constraint.spec))


# xgrammar 0.2.8 writes a JSON string's characters as `[^"\\\r\n]` (with minLength/maxLength, admitting control
# characters JSON forbids unescaped) or `[^\0-\x1f"\\\r\n]`, and both admit the UTF-16 surrogates U+D800-U+DFFF as
# 3-byte UTF-8, which no UTF-8 decoder takes: a byte-level tokenizer then streams replacement characters and the
# string's length no longer matches its bound. Ours exclude both.
_STRING_CHARS = ('[^\\"\\\\\\r\\n]', '[^\\0-\\x1f\\"\\\\\\r\\n]')
_JSON_STRING_CHAR = '[^\\0-\\x1f\\"\\\\\\ud800-\\udfff]'


def json_schema_grammar(schema: str):
    """The xgrammar Grammar of compact JSON valid under `schema` (JSON text)."""
    import xgrammar as xgr

    text = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
    for chars in _STRING_CHARS:
        text = text.replace(chars, _JSON_STRING_CHAR)
    return xgr.Grammar.from_ebnf(text)


def call_grammar(tools: list[dict]):
    """xgrammar Grammar of `[name(arg=<json>, ...)]` for one call of one of `tools`: every required argument, in
    the schema's order, each valid under its property schema."""
    import xgrammar as xgr

    calls = []
    for tool in tools:
        schema = tool["parameters"]
        props = schema.get("properties", {})
        required = [name for name in props if name in schema.get("required", [])]
        parts = [_literal(f"{tool['name']}(")]
        for j, name in enumerate(required):
            parts.append(_literal(f"{', ' if j else ''}{name}="))
            parts.append(json_schema_grammar(json.dumps(props[name])))
        parts.append(_literal(")"))
        calls.append(xgr.Grammar.concat(*parts))
    return xgr.Grammar.concat(_literal("["), xgr.Grammar.union(*calls) if len(calls) > 1 else calls[0], _literal("]"))


def _literal(text: str):
    import xgrammar as xgr

    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")
