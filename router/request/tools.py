"""Llama 4 tool calls: tool definitions, the system prompt that offers them, the grammar of a call, and the parser of
the model's output.

The format follows Meta's Llama 4 prompt format (llama-models, models/llama4/prompt_format.md, "Zero shot function
calling - system message"): the tools are listed as JSON in the system message, and the model answers with pythonic
calls, `[get_weather(city="San Francisco"), get_weather(city="Seattle")]<|eot|>`. A tool's result comes back as an
`ipython` message. Arguments are Python keyword arguments; their values are Python literals or JSON values (constrained
decoding writes JSON), so `true`, `false` and `null` are read as JSON's.

tool_choice: `auto` (the model decides; the parser is lenient and never loses text: output that is not exactly a call
list stays text), `none` (the tools are shown, nothing is parsed), `required` (decoding is constrained to one call of
one of the tools) or a tool's name (constrained to one call of that tool).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

from router.request.errors import InvalidRequest

CHOICES = ("auto", "none", "required")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_JSON_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: str = '{"type": "object", "properties": {}}'  # a JSON schema of the arguments, as JSON text


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object
    id: str = ""


@dataclass(frozen=True)
class ToolCallPart:
    """A piece of a call streamed as it is written (router/request/tool_stream.py): the first piece of call `index`
    carries its id and name, every piece some of its arguments; joined, they are the call's `arguments`."""

    index: int  # which call of the output, from 0
    id: str = ""
    name: str = ""
    arguments: str = ""


def check_tools(tools: tuple[Tool, ...], choice: str) -> list[dict]:
    """Each tool as {"name", "description", "parameters"} (parameters parsed), or InvalidRequest naming the field."""
    out, names = [], set()
    for i, tool in enumerate(tools):
        field = f"tools[{i}]"
        if not isinstance(tool.name, str) or not _IDENTIFIER.match(tool.name):
            raise InvalidRequest(f"{field}.name", f"must be a Python identifier, got {tool.name!r}")
        if tool.name in names:
            raise InvalidRequest(f"{field}.name", f"{tool.name!r} is defined twice")
        names.add(tool.name)
        out.append({"name": tool.name, "description": tool.description, "parameters": _parameters(tool, field)})
    if choice not in CHOICES and choice not in names:
        raise InvalidRequest("tool_choice", f"must be one of {list(CHOICES)} or a tool's name, got {choice!r}")
    if choice == "required" and not tools:
        raise InvalidRequest("tool_choice", "is 'required' but no tools are given")
    return out


def _parameters(tool: Tool, field: str) -> dict:
    try:
        schema = json.loads(tool.parameters or "{}")
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"{field}.parameters", f"is not valid JSON: {e}") from None
    if not isinstance(schema, dict) or schema.get("type", "object") not in ("object", "dict"):
        raise InvalidRequest(f"{field}.parameters", 'must be a JSON schema of type "object"')
    props = schema.get("properties", {})
    if not isinstance(props, dict) or not all(isinstance(k, str) and _IDENTIFIER.match(k) for k in props):
        raise InvalidRequest(
            f"{field}.parameters.properties", "must map Python identifiers (Llama 4 passes arguments by keyword)"
        )
    required = schema.get("required", [])
    if not isinstance(required, list) or any(r not in props for r in required):
        raise InvalidRequest(f"{field}.parameters.required", "must list names of its properties")
    return schema


def tools_system_prompt(tools: list[dict], system: str) -> str:
    """The system message that offers the tools (Meta's zero-shot function calling prompt, shortened)."""
    head = f"{system.strip()}\n\n" if system.strip() else ""
    listing = json.dumps(tools, indent=4)
    return (
        f"{head}You are an expert in composing functions. You are given a question and a set of possible functions. "
        "Based on the question, you may call one or more of the functions.\n"
        "If you decide to call functions, answer ONLY with the calls, in the format "
        "[func_name1(param1=value1, param2=value2), func_name2(...)]\n"
        "If none of the functions applies, answer in plain text.\n\n"
        f"Here is a list of functions in JSON format that you can invoke.\n\n{listing}\n"
    )


def render_calls(calls: tuple[ToolCall, ...], field: str) -> str:
    """An assistant message's calls as the model writes them (arguments as JSON values); `field` names them."""
    return "[" + ", ".join(_render_call(c, f"{field}[{j}]") for j, c in enumerate(calls)) + "]"


def _render_call(call: ToolCall, field: str) -> str:
    if not _IDENTIFIER.match(call.name or ""):
        raise InvalidRequest(f"{field}.name", f"must be a Python identifier, got {call.name!r}")
    try:
        args = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"{field}.arguments", f"is not valid JSON: {e}") from None
    if not isinstance(args, dict) or not all(_IDENTIFIER.match(k) for k in args):
        raise InvalidRequest(f"{field}.arguments", "must be a JSON object keyed by Python identifiers")
    return f"{call.name}(" + ", ".join(f"{k}={json.dumps(v)}" for k, v in args.items()) + ")"


def parse_calls(text: str) -> list[ToolCall] | None:
    """The calls of an output that is exactly a Llama 4 call list, or None (then it is text)."""
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        return None
    try:
        tree = ast.parse(body, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args:
            return None
        try:
            args = {kw.arg: _value(kw.value, body) for kw in node.keywords if kw.arg is not None}
        except ValueError:
            return None
        if len(args) != len(node.keywords):
            return None
        calls.append(ToolCall(node.func.id, json.dumps(args)))
    return calls


def _value(node: ast.AST, source: str):
    """A keyword's value: JSON when its text is JSON, else a Python literal (true/false/null read as JSON's)."""
    segment = ast.get_source_segment(source, node)
    try:
        return json.loads(segment)
    except (json.JSONDecodeError, TypeError):
        pass
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e, source) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** in a dict")
        return {str(_value(k, source)): _value(v, source) for k, v in zip(node.keys, node.values)}
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"not a literal: {segment}") from None
