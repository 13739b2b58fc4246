"""Llama 4 tool calls: the parser on the texts of Meta's prompt format (single, several, nested, malformed), the
rendering of tools, calls and results in the chat, the streaming hold-back that never loses text, and bad tool
definitions refused naming the field."""

from __future__ import annotations

import json

import pytest

from router.request.chat import render_chat
from router.request.errors import InvalidRequest
from router.request.messages import ChatMessage, EngineRequest
from router.request.prepare import with_tools
from router.request.sampling_params import SamplingParams
from router.request.tool_stream import ToolCallStream
from router.request.tools import Tool, ToolCall, check_tools, parse_calls

WEATHER = Tool(
    "get_weather",
    "Get weather info for places",
    json.dumps(
        {
            "type": "object",
            "required": ["city"],
            "properties": {"city": {"type": "string"}, "metric": {"type": "string", "default": "celsius"}},
        }
    ),
)


def calls(text: str) -> list[tuple[str, dict]] | None:
    parsed = parse_calls(text)
    return None if parsed is None else [(c.name, json.loads(c.arguments)) for c in parsed]


def test_the_documented_calls_parse():
    # prompt_format.md's model responses, system-message and user-message variants
    assert calls('[get_weather(city="San Francisco"), get_weather(city="Seattle")]') == [
        ("get_weather", {"city": "San Francisco"}),
        ("get_weather", {"city": "Seattle"}),
    ]
    assert calls("[get_user_info(user_id=7890, special='black')]") == [
        ("get_user_info", {"user_id": 7890, "special": "black"})
    ]
    assert calls("  [f()]\n") == [("f", {})]


def test_nested_arguments_parse_as_json_values():
    text = '[book(trip={"legs": [{"from": "BOS", "to": "NYC"}], "direct": true, "note": null}, seats=[1, 2], p=-0.5)]'
    assert calls(text) == [
        (
            "book",
            {
                "trip": {"legs": [{"from": "BOS", "to": "NYC"}], "direct": True, "note": None},
                "seats": [1, 2],
                "p": -0.5,
            },
        )
    ]
    assert calls("[f(a=(1, 2), b=True, c=None)]") == [("f", {"a": [1, 2], "b": True, "c": None})]


@pytest.mark.parametrize(
    "text",
    [
        'get_weather(city="New York")',  # documented INCORRECT: no brackets
        'Let me check the weather: [get_weather(city="New York")]',  # documented INCORRECT: text first
        '[get_weather(city="New York")',  # cut off
        '[get_weather("New York")]',  # positional
        "[get_weather(city=lookup(1))]",  # not a literal
        "[]",
        "[1, 2]",
        "[a.b(c=1)]",
        "[f(**kw)]",
    ],
)
def test_malformed_calls_are_text(text):
    assert parse_calls(text) is None


def stream(pieces: list[str]) -> tuple[str, tuple[ToolCall, ...]]:
    s, out = ToolCallStream("r"), []
    for piece in pieces:
        out.append(s.push(piece))
    rest, found = s.finish()
    return "".join(out) + rest, found


def test_streamed_text_is_never_lost_and_calls_come_whole():
    assert stream(["Hello", " [world]"]) == ("Hello [world]", ())
    assert stream(["  [not", " a call"]) == ("  [not a call", ())
    text, found = stream(["\n[get_wea", 'ther(city="Paris"),', ' get_weather(city="Oslo")]'])
    assert text == "" and [c.name for c in found] == ["get_weather", "get_weather"]
    assert [c.id for c in found] == ["r-call-0", "r-call-1"] and json.loads(found[1].arguments) == {"city": "Oslo"}
    s = ToolCallStream("r")
    assert s.push("plain") == "plain" and s.push(" [x(a=1)]") == " [x(a=1)]"  # text first: streams as text


CALLS = '[get_weather(city="Pa,ri)s \\"x\\"", days=3, opts={"a": [1, 2], "b": "(}"}), note(), f(x=null)]'


def parts_of(pieces: list[str], skip: int = 0) -> tuple[list, tuple[ToolCall, ...]]:
    """An incremental stream's parts (the last ones included) and its calls."""
    s, parts = ToolCallStream("r", incremental=True, skip_parts=skip), []
    for piece in pieces:
        assert s.push(piece) == ""
        parts += s.take_parts()
    rest, calls = s.finish()
    assert rest == ""
    return parts + list(s.take_parts()), calls


def joined(parts) -> dict[int, tuple[str, str, str]]:
    out = {}
    for p in parts:
        ident, name, args = out.get(p.index, ("", "", ""))
        out[p.index] = (ident or p.id, name or p.name, args + p.arguments)
    return out


def test_a_constrained_call_streams_argument_by_argument_and_its_parts_join_to_the_whole_call():
    whole, calls = parts_of([CALLS])
    by_char, _ = parts_of(list(CALLS))
    assert whole == by_char  # however the text is cut
    assert joined(whole) == {j: (c.id, c.name, c.arguments) for j, c in enumerate(calls)}
    assert [p.arguments for p in whole if p.index == 0] == [
        "",
        '{"city": "Pa,ri)s \\"x\\""',
        ', "days": 3',
        ', "opts": {"a": [1, 2], "b": "(}"}',
        "}",
    ]
    assert [(p.name, p.arguments) for p in whole if p.index == 1] == [("note", ""), ("", "{}")]
    # a resumed stream drops what its client already has, and the rest is the same
    assert parts_of(list(CALLS), skip=4)[0] == whole[4:]


def test_what_the_scanner_cannot_read_comes_in_the_last_part():
    # single quotes (Python's, not JSON's): the scanner cuts the string at its comma and stops; the end sends the rest
    parts, calls = parts_of(["[f(a='x,y', b=2), g(c=1)]"])
    assert joined(parts) == {j: (c.id, c.name, c.arguments) for j, c in enumerate(calls)}
    assert [p.arguments for p in parts] == ["", '{"a": "x,y", "b": 2}', "", '{"c": 1}']
    parts, calls = parts_of(["[f(a=(1, 2), b=3)]"])  # a tuple: the final parser reads it, the scanner too
    assert joined(parts)[0][2] == calls[0].arguments == '{"a": [1, 2], "b": 3}'


def test_tools_render_in_the_system_message_and_calls_and_results_in_turn():
    tools = check_tools((WEATHER,), "auto")
    text = render_chat(
        (
            ChatMessage("system", "Be brief."),
            ChatMessage("user", "Weather in Paris?"),
            ChatMessage("assistant", "", (ToolCall("get_weather", '{"city": "Paris"}'),)),
            ChatMessage("tool", '{"temp": 21}'),
        ),
        tools,
    )
    assert text.startswith("<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.\n\n")
    assert '"name": "get_weather"' in text and "[func_name1(param1=value1" in text
    assert '<|header_start|>assistant<|header_end|>\n\n[get_weather(city="Paris")]<|eot|>' in text
    assert text.endswith(
        '<|header_start|>ipython<|header_end|>\n\n{"temp": 21}<|eot|><|header_start|>assistant<|header_end|>\n\n'
    )
    alone = render_chat((ChatMessage("user", "hi"),), tools)  # no system message: one is made for the tools
    assert alone.startswith("<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are an expert")


@pytest.mark.parametrize(
    "tools, choice, field",
    [
        ((Tool("get weather"),), "auto", "tools[0].name"),
        ((WEATHER, WEATHER), "auto", "tools[1].name"),
        ((Tool("f", parameters="{nope"),), "auto", "tools[0].parameters"),
        ((Tool("f", parameters='{"type": "string"}'),), "auto", "tools[0].parameters"),
        ((Tool("f", parameters='{"type": "object", "properties": {"a-b": {}}}'),), "auto",
         "tools[0].parameters.properties"),
        ((Tool("f", parameters='{"type": "object", "properties": {}, "required": ["x"]}'),), "auto",
         "tools[0].parameters.required"),
        ((WEATHER,), "get_time", "tool_choice"),
        ((), "required", "tool_choice"),
    ],
)  # fmt: skip
def test_bad_tool_definitions_are_refused_naming_the_field(tools, choice, field):
    with pytest.raises(InvalidRequest) as e:
        check_tools(tools, choice)
    assert e.value.field == field


def test_tool_choice_sets_parsing_and_the_call_constraint():
    chat = (ChatMessage("user", "hi"),)
    req = lambda choice: EngineRequest("r", SamplingParams(), messages=chat, tools=(WEATHER,), tool_choice=choice)  # noqa: E731
    assert (
        with_tools(req("auto"), SamplingParams()).tool_calls
        and not with_tools(req("auto"), SamplingParams()).constraint
    )
    assert not with_tools(req("none"), SamplingParams()).tool_calls
    named = with_tools(req("get_weather"), SamplingParams())
    assert named.tool_calls and named.constraint.kind == "tool_call"
    assert [t["name"] for t in json.loads(named.constraint.spec)] == ["get_weather"]
    with pytest.raises(InvalidRequest, match="tools") as e:
        with_tools(EngineRequest("r", SamplingParams(), prompt="x", tools=(WEATHER,)), SamplingParams())
    assert e.value.field == "tools"
    with pytest.raises(InvalidRequest) as e:
        render_chat((ChatMessage("assistant", "", (ToolCall("f", "[1]"),)),))
    assert e.value.field == "messages[0].tool_calls[0].arguments"
