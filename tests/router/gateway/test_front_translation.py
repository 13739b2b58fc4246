"""The KServe v2 and OpenAI translations on their own (no server): what each request shape becomes as an engine
request, and which inputs are refused naming which field. The end-to-end tests (test_kserve.py, test_openai.py,
test_fronts.py) drive the same code through the real clients."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from protos.kserve.v2 import grpc_predict_v2_pb2 as kpb
from router.gateway import kserve_tensors
from router.gateway.openai_request import chat_request, completion_request
from router.request.errors import InvalidRequest
from router.request.messages import FinishReason, ImagePart


def test_openai_sampling_keys_reach_sampling_params():
    body = {"prompt": "hi", "temperature": 0.5, "max_tokens": 9, "max_completion_tokens": 7, "stop": "x", "top_k": 3}
    r = completion_request({**body, "min_p": 0.1, "ignore_eos": True, "stop_token_ids": [5], "logprobs": 2}, "id")
    p = r.engine.params
    assert (p.temperature, p.max_tokens, p.stop, p.top_k, p.min_p, p.ignore_eos) == (0.5, 7, ("x",), 3, 0.1, True)
    assert (p.stop_token_ids, p.logprobs, p.top_logprobs) == ((5,), True, 2)
    assert completion_request({"prompt": [[1, 2, 3]]}, "id").engine.prompt_ids == (1, 2, 3)
    assert completion_request({"prompt": "hi", "n": 3}, "id").n == 3 and completion_request(body, "id").n == 1
    batch = completion_request({"prompt": ["a", [5, 6]], "cache_salt": "t"}, "id").engines
    assert [(e.request_id, e.prompt, e.prompt_ids, e.cache_salt) for e in batch] == [
        ("id-0", "a", None, "t"),
        ("id-1", None, (5, 6), "t"),
    ]
    biased = chat_request({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"9": -100}}, "id")
    assert biased.engine.params.logit_bias == ((9, -100.0),)


def test_openai_chat_parts_and_roles():
    url = "data:image/png;base64," + "iVBORw0KGgo="
    parts = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": url}}]
    messages = [{"role": "developer", "content": "sys"}, {"role": "user", "content": parts}]
    r = chat_request({"messages": messages, "stream": True, "stream_options": {"include_usage": True}}, "id")
    (system, user) = r.engine.messages
    assert system.role == "system" and user.content[0] == "a" and isinstance(user.content[1], ImagePart)
    assert r.stream and r.include_usage


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": "x", "n": "2"}, "n"),
        ({"prompt": "x", "tools": [{}]}, "tools"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stop": 3}, "stop"),
        ({"prompt": ["a", 5]}, "prompt[1]"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "x", "model": 3}, "model"),
    ],
)
def test_openai_refusals_name_the_field(body, field):
    with pytest.raises(InvalidRequest) as e:
        completion_request(body, "id")
    assert e.value.field == field


def infer_request(*tensors, raw: bool = True, **params) -> kpb.ModelInferRequest:
    """tensors: (name, datatype, shape, values); raw: in raw_input_contents (as tritonclient sends them)."""
    req = kpb.ModelInferRequest(model_name="m", id="r1")
    for name, datatype, shape, values in tensors:
        t = req.inputs.add(name=name, datatype=datatype, shape=shape)
        if datatype == "BYTES":
            data = b"".join(struct.pack("<I", len(v)) + v for v in values)
            if not raw:
                t.contents.bytes_contents.extend(values)
        else:
            data = np.asarray(
                values, dtype={"INT32": "<i4", "INT64": "<i8", "BOOL": "?", "FP32": "<f4"}[datatype]
            ).tobytes()
            if not raw:
                getattr(t.contents, {"INT32": "int_contents", "INT64": "int64_contents"}[datatype]).extend(values)
        if raw:
            req.raw_input_contents.append(data)
    for k, v in params.items():
        field = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[type(v)]
        setattr(req.parameters[k], field, v)
    return req


@pytest.mark.parametrize("raw", [True, False])
def test_kserve_inputs_raw_or_typed(raw):
    req = infer_request(("text_input", "BYTES", [1], [b"hello"]), ("max_tokens", "INT32", [1], [5]), raw=raw,
                        temperature=0.0, stop='["a", "b"]', top_k=4)  # fmt: skip
    r = kserve_tensors.engine_request(req, "r1")
    assert r.engine.prompt == "hello" and r.engine.params.max_tokens == 5 and r.engine.params.stop == ("a", "b")
    assert r.engine.params.top_k == 4 and r.stream is None and r.outputs == ("text_output", "output_ids")
    ids = kserve_tensors.engine_request(infer_request(("input_ids", "INT64", [1, 3], [7, 8, 9]), stream=False), "r")
    assert ids.engine.prompt_ids == (7, 8, 9) and ids.stream is False
    vllm_style = infer_request(("text_input", "BYTES", [1], [b"x"]), sampling_parameters='{"top_p": 0.5, "seed": 3}')
    assert kserve_tensors.engine_request(vllm_style, "r").engine.params.top_p == 0.5
    biased = infer_request(("text_input", "BYTES", [1], [b"x"]), logit_bias='{"7": 100, "2": -100}')
    assert kserve_tensors.engine_request(biased, "r").engine.params.logit_bias == ((2, -100.0), (7, 100.0))


@pytest.mark.parametrize(
    "req, field",
    [
        (infer_request(("text_input", "BYTES", [2], [b"a", b"b"])), "inputs.text_input"),
        (infer_request(("text_input", "BYTES", [3], [b"a"])), "inputs[0].shape"),
        (infer_request(("text_input", "FP32", [1], [1.0])), "inputs[0].datatype"),
        (infer_request(("text_input", "BYTES", [1], [b"\xff\xfe"])), "inputs.text_input"),
        (
            infer_request(
                ("image", "BYTES", [1], [b"data:text/plain;base64,eA=="]), ("text_input", "BYTES", [1], [b"x"])
            ),
            "inputs.image[0]",
        ),
        (
            infer_request(("text_input", "BYTES", [1], [b"x"]), sampling_parameters="{"),
            "parameters.sampling_parameters",
        ),
        (infer_request(("text_input", "BYTES", [1], [b"x"]), logit_bias="[1]"), "parameters.logit_bias"),
    ],
)
def test_kserve_refusals_name_the_field(req, field):
    with pytest.raises(InvalidRequest) as e:
        kserve_tensors.engine_request(req, "r1")
    assert e.value.field == field, e.value


def test_kserve_truncated_bytes_are_refused():
    req = infer_request(("text_input", "BYTES", [1], [b"hello"]))
    req.raw_input_contents[0] = req.raw_input_contents[0][:6]
    with pytest.raises(InvalidRequest, match="runs past the data's end"):
        kserve_tensors.engine_request(req, "r1")


def test_kserve_response_tensors_and_the_final_parameters():
    class Final:
        finish_reason, prompt_tokens, completion_tokens = FinishReason.LENGTH, 3, 2

    out = kserve_tensors.response("m", "r1", "hé", [5, 6], ("text_output", "output_ids"), Final(), last=True)
    assert [o.name for o in out.outputs] == ["text_output", "output_ids"] and out.id == "r1"
    assert out.raw_output_contents[0] == struct.pack("<I", 3) + "hé".encode()
    assert np.frombuffer(out.raw_output_contents[1], "<i8").tolist() == [5, 6]
    assert out.parameters["finish_reason"].string_param == "length"
    assert out.parameters["triton_final_response"].bool_param


def test_openai_cache_salt_reaches_the_engine_request_and_a_bad_one_names_its_key():
    body = {"messages": [{"role": "user", "content": "hi"}], "cache_salt": "tenant-a"}
    assert chat_request(body, "id").engine.cache_salt == "tenant-a"
    assert completion_request({"prompt": "hi", "cache_salt": "t"}, "id").engine.cache_salt == "t"
    assert completion_request({"prompt": "hi"}, "id").engine.cache_salt is None
    with pytest.raises(InvalidRequest) as e:
        completion_request({"prompt": "hi", "cache_salt": 7}, "id")
    assert e.value.field == "cache_salt"


def test_openai_usage_reports_the_prompt_tokens_served_from_the_prefix_cache():
    from router.gateway.openai_response import usage
    from router.request.messages import Final

    final = Final("id", FinishReason.LENGTH, prompt_tokens=40, completion_tokens=5, cached_tokens=32)
    assert usage([final]) == {
        "prompt_tokens": 40,
        "completion_tokens": 5,
        "total_tokens": 45,
        "prompt_tokens_details": {"cached_tokens": 32},
    }


def test_openai_tools_tool_choice_and_earlier_calls_reach_the_engine_request():
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]  # fmt: skip
    r = chat_request({"messages": messages, "tools": [tool], "tool_choice": {"function": {"name": "f"}}}, "id")
    (t,) = r.engine.tools
    assert (t.name, t.description, t.parameters) == ("f", "d", '{"type": "object"}')
    assert r.engine.tool_choice == "f"
    assert r.engine.messages[1].tool_calls[0].arguments == '{"x": 1}' and r.engine.messages[2].role == "ipython"
    assert chat_request({"messages": messages[:1], "tool_choice": "none"}, "id").engine.tool_choice == "none"


@pytest.mark.parametrize(
    "body, kind",
    [
        ({"response_format": {"type": "json_object"}}, "json_object"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}}, "json_schema"),
        ({"guided_regex": "[a-z]+"}, "regex"),
        ({"guided_choice": ["yes", "no"]}, "choice"),
        ({"guided_json": {"type": "object"}}, "json_schema"),
    ],
)
def test_openai_output_constraints_become_the_engines_constraint(body, kind):
    r = completion_request({"prompt": "hi", **body}, "id")
    assert r.engine.params.constraint.kind == kind
    assert (
        completion_request({"prompt": "hi", "response_format": {"type": "text"}}, "id").engine.params.constraint is None
    )


@pytest.mark.parametrize(
    "body, field",
    [
        ({"tools": {"name": "f"}}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
            "tools[0].function.parameters",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ],
)
def test_openai_bad_tools_and_constraints_name_their_key(body, field):
    with pytest.raises(InvalidRequest) as e:
        chat_request({"messages": [{"role": "user", "content": "hi"}], **body}, "id")
    assert e.value.field == field


def test_an_openai_stream_sends_no_chunk_for_tokens_whose_text_is_held_back():
    from router.gateway.openai_response import Reply
    from router.request.messages import Delta, TokenLogprob

    held, text = Delta("id", (5,), ""), Delta("id", (6,), "7")
    chat = Reply(True, "id", "m", None)
    assert chat.carries(held)  # the first chunk of a chat names the role
    assert chat.chunk(held)["choices"][0]["delta"] == {"content": "", "role": "assistant"}
    assert not chat.carries(held) and chat.carries(text)
    completion = Reply(False, "id", "m", None)
    assert not completion.carries(held) and completion.carries(text)
    with_logprobs = Reply(False, "id", "m", None, want_logprobs=True)
    assert with_logprobs.carries(Delta("id", (5,), "", (TokenLogprob(5, -0.1),)))  # the token's logprob is news


def test_an_openai_stream_of_n_choices_ends_every_choice_when_one_fails():
    """The merge of n choices' runs into one event stream (openai_api._events): choice 1 fails after a token; the
    error is an event, choice 0 (which would run on) is closed, which is what aborts it in the engine."""
    import asyncio
    import json

    from router.gateway.generations import Code, GatewayError
    from router.gateway.openai_api import _events
    from router.gateway.openai_response import Reply
    from router.request.messages import Delta

    closed = []

    async def runs_on(i):
        try:
            while True:
                yield Delta(f"r-{i}", (7,), "7")
                await asyncio.sleep(0.01)
        finally:
            closed.append(i)

    async def fails(i):
        try:
            yield Delta(f"r-{i}", (8,), "8")
            raise GatewayError(Code.UNAVAILABLE, "the cluster failed: router lost")
        finally:
            closed.append(i)

    async def main():
        runs = [runs_on(0), fails(1)]
        firsts = [await r.__anext__() for r in runs]
        replies = [Reply(False, "r", "m", None, index=i) for i in range(2)]
        return [e["data"] async for e in _events(runs, firsts, replies, include_usage=False)]

    events = asyncio.run(asyncio.wait_for(main(), 30))
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["message"] == "the cluster failed: router lost" and error["type"] == "service_unavailable"
    assert {json.loads(e)["choices"][0]["index"] for e in events[:-2]} <= {0, 1}
    assert sorted(closed) == [0, 1]
