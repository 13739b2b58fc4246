"""OpenAI's `tools`, `tool_choice`, `response_format` (and vLLM's `guided_*` extras) -> the engine's tools, tool
choice and output constraint (router/request/tools.py, router/request/constraint.py). No I/O. Every refusal is an
InvalidRequest naming the body key as the client wrote it (`tools[1].function.parameters`), and the engine's own
checks (a tool's name, its schema, a constraint that does not compile) name the same keys through `field_name`.
"""

from __future__ import annotations

import json

from router.request.constraint import Constraint
from router.request.errors import InvalidRequest
from router.request.tools import Tool, ToolCall

TOOL_CHOICE_MODES = ("auto", "none", "required")
GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_grammar": "grammar", "guided_choice": "choice"}


def tools_of(body: dict) -> tuple[Tool, ...]:
    """`tools`: [{"type": "function", "function": {"name", "description"?, "parameters"?}}]."""
    tools = body.get("tools")
    if tools in (None, []):
        return ()
    if not isinstance(tools, list):
        raise InvalidRequest("tools", 'must be a list of {"type": "function", "function": {...}} objects')
    return tuple(_tool(f"tools[{i}]", t) for i, t in enumerate(tools))


def _tool(field: str, tool) -> Tool:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise InvalidRequest(f"{field}.type", 'must be "function" (the only tool type this server runs)')
    fn = tool.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest(f"{field}.function", 'must be an object with a "name" (and description, parameters)')
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise InvalidRequest(f"{field}.function.description", "must be a string")
    parameters = fn.get("parameters")
    if parameters is None:
        return Tool(fn["name"], description)
    if not isinstance(parameters, dict):
        raise InvalidRequest(f"{field}.function.parameters", "must be a JSON schema object")
    return Tool(fn["name"], description, json.dumps(parameters))


def tool_choice_of(body: dict) -> str:
    """`tool_choice`: "auto" | "none" | "required" | {"type": "function", "function": {"name": NAME}}."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in TOOL_CHOICE_MODES:
            raise InvalidRequest("tool_choice", f"must be one of {', '.join(TOOL_CHOICE_MODES)} or a named function")
        return choice
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise InvalidRequest("tool_choice", 'must be a mode or {"type": "function", "function": {"name": "..."}}')
    return fn["name"]


def tool_calls_of(field: str, message: dict) -> tuple[ToolCall, ...]:
    """An assistant message's earlier `tool_calls` (so the model sees what it called)."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise InvalidRequest(f"{field}.tool_calls", "must be a list of tool calls")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequest(f"{field}.tool_calls[{j}].function", 'must be {"name": ..., "arguments": "{...}"}')
        arguments = fn.get("arguments") or "{}"
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        out.append(ToolCall(fn["name"], arguments, str(call.get("id") or "")))
    return tuple(out)


def constraint_of(body: dict) -> Constraint | None:
    """`response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": {...}}}), or
    one of vLLM's `guided_json` / `guided_regex` / `guided_grammar` / `guided_choice`; at most one."""
    given = [key for key in ("response_format", *GUIDED) if body.get(key) is not None]
    if len(given) > 1:
        raise InvalidRequest(given[1], f"give one output constraint, not {' and '.join(given)}")
    if not given:
        return None
    key, value = given[0], body[given[0]]
    if key in GUIDED:
        return _guided(key, value)
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        schema = (value.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format.json_schema.schema", "must be a JSON schema object")
        return Constraint("json_schema", json.dumps(schema))
    raise InvalidRequest("response_format.type", f"must be text, json_object or json_schema, got {kind!r}")


def _guided(key: str, value) -> Constraint:
    kind = GUIDED[key]
    if kind == "choice":
        if not isinstance(value, list):
            raise InvalidRequest(key, "must be a list of strings")
        return Constraint("choice", choices=tuple(value))
    if kind == "json_schema" and isinstance(value, dict):
        return Constraint("json_schema", json.dumps(value))
    if not isinstance(value, str):
        raise InvalidRequest(key, "must be a string" + (" or a JSON schema object" if kind == "json_schema" else ""))
    return Constraint(kind, value)


def field_name(field: str) -> str:
    """An engine field as an OpenAI client wrote it: the constraint and tool fields."""
    if field in ("json_schema", "json_object"):
        return "response_format"
    if field in ("regex", "grammar", "choice"):
        return f"guided_{field}"
    if field.startswith("tools[") and field.endswith(".parameters"):
        return field.replace(".parameters", ".function.parameters")
    if field.startswith("tools[") and field.endswith(".name"):
        return field.replace(".name", ".function.name")
    return field


def openai_tool_call(call: ToolCall, index: int) -> dict:
    """A call as OpenAI writes it in a message (and, with `index`, in a stream delta)."""
    return {
        "index": index,
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
