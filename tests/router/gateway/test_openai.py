"""The OpenAI-compatible HTTP front end to end, driven by the `openai` SDK (and raw HTTP where the SDK cannot go
wrong on purpose) against a real server: models, completions and chat completions whole and streamed (usage,
include_usage, logprobs, [DONE]), errors in OpenAI's JSON shape with the right status naming the field, overload,
and a client that disconnects (mid-stream, or while a whole answer is computed) frees the request's KV blocks.

One server for the module (1 router, 2 expert workers, at most 6 open generations)."""

from __future__ import annotations

import json
import socket
import time

import httpx2 as httpx
import openai
import pytest

from protos.client import InferenceClient
from tests.router.gateway.fronts import GREEDY, engine_idle, openai_client, serve, wait_running

pytestmark = pytest.mark.slow
LIMIT = 6
GREEDY_SDK = dict(temperature=0.0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    srv = serve(tiny_model_dir, max_concurrent_streams=LIMIT)
    yield srv
    srv.stop(grace_s=2.0)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def url(server):
    return f"http://127.0.0.1:{server.gateway.http_port}"


def test_models_lists_the_served_model_and_an_unknown_one_is_404(client, server):
    (card,) = client.models.list().data
    assert card.id == server.model_name and card.owned_by == "moecluster"
    assert client.models.retrieve(server.model_name).id == server.model_name
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.body["param"] == "model" and "gpt-4" in e.value.body["message"]


def test_completion_whole_and_streamed_give_the_same_text_and_usage(client, server):
    kw = dict(model=server.model_name, prompt="count from 7", max_tokens=12, extra_body=GREEDY)
    whole = client.completions.create(**kw)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12  # include_usage: a chunk of its own


def test_n_choices_are_each_the_request_with_its_own_seed_whole_and_streamed(client, server):
    kw = dict(
        model=server.model_name, prompt="count from 3", max_tokens=10, temperature=1.0, extra_body={"ignore_eos": True}
    )
    whole = client.completions.create(**kw, n=3, seed=11)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    alone = [client.completions.create(**kw, seed=11 + i) for i in range(3)]  # choice i: seed + i, as vLLM's
    assert [c.text for c in whole.choices] == [a.choices[0].text for a in alone]
    assert whole.usage.completion_tokens == 30 and whole.usage.prompt_tokens == alone[0].usage.prompt_tokens
    chunks = list(client.completions.create(**kw, n=3, seed=11, stream=True, stream_options={"include_usage": True}))
    streamed = {
        i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)
    }
    assert streamed == {c.index: c.text for c in whole.choices}
    finishes = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(f.index for f in finishes) == [0, 1, 2] and {f.finish_reason for f in finishes} == {"length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    chat = client.chat.completions.create(
        model=server.model_name, messages=[{"role": "user", "content": "count from 3"}], max_tokens=4, n=2, **GREEDY_SDK
    )
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message == chat.choices[1].message
    engine_idle(server)  # every choice's KV blocks freed


def test_a_batch_of_prompts_gives_each_prompts_choices_in_order_whole_and_streamed(client, server, url):
    prompts = ["count from 3", [1, 40, 41, 42], "count from 9"]
    kw = dict(model=server.model_name, max_tokens=6, temperature=0.0, extra_body={"ignore_eos": True})
    alone = [client.completions.create(**kw, prompt=p) for p in prompts]
    batch = client.completions.create(**kw, prompt=prompts, n=2)
    assert [c.index for c in batch.choices] == list(range(6))  # prompt p's choice j at p * n + j
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone for _ in range(2)]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)  # each prompt counted once
    assert batch.usage.completion_tokens == 36
    chunks = list(client.completions.create(**kw, prompt=prompts, stream=True, stream_options={"include_usage": True}))
    texts = {i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)}
    assert texts == {i: a.choices[0].text for i, a in enumerate(alone)}
    assert chunks[-1].usage.completion_tokens == 18
    # one bad prompt refuses the batch, naming it, and admits none of the others
    r = httpx.post(f"{url}/v1/completions", json={"prompt": ["count", [1, 99999999]], "max_tokens": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[1]", r.text
    with InferenceClient(server.target) as c:
        assert c.cluster_status().gateway.active_streams == 0


def test_logit_bias_bans_and_forces_tokens_the_same_through_moecluster_v1_and_openai(client, server):
    kw = dict(prompt="count from 3", max_tokens=5, temperature=0.0, ignore_eos=True)
    with InferenceClient(server.target) as v1:
        plain = v1.generate_text(**kw)
        first = plain.token_ids[0]
        banned = v1.generate_text(**kw, logit_bias={first: -100.0})
        forced = v1.generate_text(**kw, logit_bias={7: 100.0})
    assert banned.token_ids[0] != first and forced.token_ids == [7] * 5
    sdk = dict(model=server.model_name, prompt="count from 3", max_tokens=5, temperature=0.0, extra_body=GREEDY)
    assert client.completions.create(**sdk, logit_bias={str(first): -100}).choices[0].text == banned.text
    assert client.completions.create(**sdk, logit_bias={"7": 100}).choices[0].text == forced.text
    for bias, words in (({"7": 500}, "[-100, 100]"), ({"seven": 1}, "token ids"), ({"99999999": 1}, "vocabulary")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**sdk, logit_bias=bias)
        assert e.value.body["param"] == "logit_bias" and words in e.value.body["message"], e.value.body


def test_chat_whole_and_streamed_with_logprobs(client, server):
    kw = dict(
        model=server.model_name,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"}],
        max_completion_tokens=8,
        logprobs=True,
        top_logprobs=3,
        extra_body=GREEDY,
    )
    whole = client.chat.completions.create(**kw)
    message = whole.choices[0].message
    assert whole.object == "chat.completion" and message.role == "assistant"
    assert whole.usage.completion_tokens == 8
    content = whole.choices[0].logprobs.content
    assert len(content) == 8 and all(len(lp.top_logprobs) == 3 and lp.logprob <= 0 for lp in content)
    assert all(lp.token and lp.bytes == list(lp.token.encode()) for lp in content)  # special tokens named too
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 8


def test_the_stream_is_server_sent_events_ending_in_done(url, server):
    body = {"model": server.model_name, "prompt": "hi", "max_tokens": 3, "stream": True, **GREEDY}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 3  # the last chunk carries usage


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"prompt": "hi", "temperature": -1}, "temperature", ["must be a number >= 0"]),
        ({"prompt": "hi", "n": 0}, "n", ["integer >= 1"]),
        ({"prompt": "hi", "n": LIMIT + 1}, "n", [f"at most {LIMIT} choices"]),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens (or max_completion_tokens)", ["integer >= 1"]),
        ({"prompt": 5}, "prompt", ["string or a list of token ids"]),
        ({"prompt": "hi", "stop": [1]}, "stop", ["strings"]),
        ({"prompt": [1, 99999999]}, "input_ids", ["vocabulary"]),
    ],
)
def test_bad_completions_are_400_naming_the_field(url, body, param, words):
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "invalid_request_error" and error["param"] == param, error
    assert all(w in error["message"] for w in words), error


@pytest.mark.parametrize(
    "messages, extra, param",
    [
        ([{"role": "robot", "content": "x"}], {}, "messages[0].role"),
        ([], {}, "messages"),
        ([{"role": "user", "content": [{"type": "video"}]}], {}, "messages[0].content[0]"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
            {},
            "messages[0].content[0].image_url.url",
        ),
        ([{"role": "user", "content": "x"}], {"tools": [{"type": "function"}]}, "tools[0].function"),
        (
            [{"role": "user", "content": "x"}],
            {"response_format": {"type": "json_schema", "json_schema": {}}},
            "response_format.json_schema.schema",
        ),
        ([{"role": "user", "content": "x"}], {"logprobs": 3}, "logprobs"),
    ],
)
def test_bad_chats_are_400_naming_the_field(url, messages, extra, param):
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, **extra}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_body_that_is_not_json_is_400(url):
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body" and "JSON" in r.json()["error"]["message"]


def test_beyond_the_open_generations_limit_is_429_and_the_rest_serve_on(url, server):
    body = {"prompt": "x", "max_tokens": 1500, "stream": True, **GREEDY}
    with httpx.Client(timeout=60) as http:
        streams = [http.stream("POST", f"{url}/v1/completions", json=body) for _ in range(LIMIT)]
        opened = [s.__enter__() for s in streams]
        try:
            assert all(r.status_code == 200 for r in opened)
            r = http.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error", r.text
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    engine_idle(server)
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60).status_code == 200


def test_n_choices_beyond_the_open_streams_left_are_429_and_admit_none(url, server):
    body = {"prompt": "x", "max_tokens": 1500, "stream": True, **GREEDY}
    with httpx.Client(timeout=60) as http:
        streams = [http.stream("POST", f"{url}/v1/completions", json=body) for _ in range(LIMIT - 2)]
        opened = [s.__enter__() for s in streams]
        try:
            assert all(r.status_code == 200 for r in opened)
            r = http.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 3})
            assert r.status_code == 429 and "these 3 choices need 3" in r.json()["error"]["message"], r.text
            with InferenceClient(server.target) as c:
                assert c.cluster_status().gateway.active_streams == LIMIT - 2  # none of the 3 was admitted
            assert http.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 2}).status_code == 200
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    engine_idle(server)


def _aborted(server) -> int:
    with InferenceClient(server.target) as c:
        return c.cluster_status().router.finished.get("abort", 0)


@pytest.mark.parametrize("n", [1, 3])
def test_a_client_that_disconnects_mid_stream_frees_its_kv_blocks(url, server, n):
    aborted = _aborted(server)
    body = {"prompt": "count", "max_tokens": 1500, "stream": True, "n": n, **GREEDY}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # a token arrived: it runs
        wait_running(server, n)
    assert engine_idle(server)  # closing the connection aborted every choice on its router
    assert _aborted(server) == aborted + n


@pytest.mark.parametrize("n", [1, 3])
def test_a_client_that_disconnects_before_a_whole_answer_frees_its_kv_blocks(url, server, n):
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"prompt": "count", "max_tokens": 1500, "n": n, **GREEDY}).encode()
    aborted = _aborted(server)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        wait_running(server, n)
    assert engine_idle(server)
    deadline = time.monotonic() + 10
    while _aborted(server) < aborted + n:
        assert time.monotonic() < deadline, "the choices were not all aborted"
        time.sleep(0.1)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            "required": ["city", "days"],
        },
    },
}


def test_a_named_tool_choice_gives_a_call_whose_arguments_validate_whole_and_streamed(client, server):
    import jsonschema

    kw = dict(
        model=server.model_name,
        messages=[{"role": "user", "content": "weather in Paris for 3 days?"}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=160,
        temperature=1.0,
        seed=5,
    )
    whole = client.chat.completions.create(**kw)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    # argument by argument: the first delta names the call, the others add to its arguments (as vLLM streams them)
    assert streamed[0].function.name == "get_weather" and streamed[0].id.endswith("-call-0")
    assert streamed[0].type == "function"
    assert all(tc.index == 0 and not tc.id and not tc.function.name for tc in streamed[1:])
    assert len(streamed) >= 3 and "".join(tc.function.arguments for tc in streamed) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_response_format_json_schema_gives_valid_json_at_temperature_one(client, server):
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "maximum": 120}},
        "required": ["name", "age"],
    }
    for seed in range(3):
        out = client.chat.completions.create(
            model=server.model_name,
            messages=[{"role": "user", "content": "a person"}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
            max_tokens=160,
            temperature=1.0,
            seed=seed,
        )
        jsonschema.validate(json.loads(out.choices[0].message.content), schema)


def test_bad_tools_and_constraints_are_400s_naming_the_body_key(client, server):
    base = dict(model=server.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    bad_tool = {"type": "function", "function": {"name": "not a name", "parameters": {"type": "object"}}}
    for extra, param in [
        (dict(tools=[bad_tool]), "tools[0].function.name"),
        (dict(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
        (dict(response_format={"type": "xml"}), "response_format.type"),
        (dict(extra_body={"guided_regex": "(unclosed"}), "guided_regex"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**base, **extra)
        assert e.value.body["param"] == param, (extra, e.value.body)
