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
        ({"prompt": "hi", "n": 2}, "n", ["only 1"]),
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
        ([{"role": "user", "content": "x"}], {"tools": [{"type": "function"}]}, "tools"),
        ([{"role": "user", "content": "x"}], {"response_format": {"type": "json_object"}}, "response_format"),
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


def test_a_client_that_disconnects_mid_stream_frees_its_kv_blocks(url, server):
    body = {"prompt": "count", "max_tokens": 1500, "stream": True, **GREEDY}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # a token arrived: it runs
        wait_running(server)
    assert engine_idle(server)  # closing the connection aborted it on its router
    with InferenceClient(server.target) as c:
        assert c.cluster_status().router.finished.get("abort", 0) >= 1


def test_a_client_that_disconnects_before_a_whole_answer_frees_its_kv_blocks(url, server):
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"prompt": "count", "max_tokens": 1500, **GREEDY}).encode()
    with InferenceClient(server.target) as c:
        aborted = c.cluster_status().router.finished.get("abort", 0)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        wait_running(server)
    assert engine_idle(server)
    deadline = time.monotonic() + 10
    with InferenceClient(server.target) as c:
        while c.cluster_status().router.finished.get("abort", 0) == aborted:
            assert time.monotonic() < deadline, "the request was not aborted"
            time.sleep(0.1)
