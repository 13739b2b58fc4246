"""The three fronts on one cluster (a tiny vision model, 2 routers, 2 expert workers): the same request gives the
same tokens and text through moecluster.v1, KServe v2 (unary and streamed) and OpenAI (completions and chat,
whole and streamed), greedy and seeded; an image chat gives the same answer on every front that takes images; bad
input on each front gets that front's own error naming the field while two other streams go on; and a router
killed mid-stream costs the HTTP and KServe streams no token (they continue on the other router).

One server for the module; the router kill comes last."""

from __future__ import annotations

import base64
import os
import signal
import threading

import httpx2 as httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from deploy.bench.interruption import StreamLog, interrupted, kill_when_ready, ready_to_kill, too_late
from deploy.tiny.squares import QUESTION, square_png
from protos.client import InferenceClient
from protos.client_types import GenerationError
from tests.router.gateway.fronts import (
    GREEDY,
    KServeStream,
    images_input,
    kserve_infer,
    openai_client,
    scrape,
    serve,
    tensor,
    text_input,
)
from tests.router.gateway.harness import router_pid

pytestmark = pytest.mark.slow
PROMPT = "count from 7"
SEEDED = dict(temperature=0.8, top_p=0.95, seed=7, ignore_eos=True)
TOKENS = 60  # per stream of the router-kill test
RED, BLUE = square_png("red", 40, 50, 1), square_png("blue", 30, 30, 2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from deploy.tiny.model import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("vlm"), "scout", train_steps=0, vision=True))


@pytest.fixture(scope="module")
def server(model_dir):
    srv = serve(model_dir, routers=2, max_images_per_request=2)
    yield srv
    srv.stop(grace_s=2.0)


@pytest.fixture(scope="module")
def oa(server):
    return openai_client(server)


@pytest.fixture
def kserve(server):
    c = triton.InferenceServerClient(server.target)
    yield c
    c.close()


def every_front_text(server, oa, kserve, sampling: dict, n: int = 16) -> dict[str, tuple]:
    """(completion tokens, text) of PROMPT through each front and mode."""
    with InferenceClient(server.target) as v1:
        got = v1.generate_text(prompt=PROMPT, max_tokens=n, **sampling)
        out = {"moecluster": (len(got.token_ids), got.text)}
    ids, text, _ = kserve_infer(kserve, [text_input(PROMPT)], max_tokens=n, **sampling)
    out["kserve"] = (len(ids), text)
    stream = KServeStream(kserve)
    try:
        stream.send("s", [text_input(PROMPT)], max_tokens=n, **sampling)
        ids, text, _, _ = stream.collect("s")
        out["kserve stream"] = (len(ids), text)
    finally:
        stream.close()
    kw = dict(model=server.model_name, prompt=PROMPT, max_tokens=n, extra_body={"ignore_eos": True})
    kw.update({k: v for k, v in sampling.items() if k in ("temperature", "top_p", "seed")})
    whole = oa.completions.create(**kw)
    out["openai"] = (whole.usage.completion_tokens, whole.choices[0].text)
    chunks = list(oa.completions.create(**kw, stream=True))
    out["openai stream"] = (chunks[-1].usage.completion_tokens, "".join(c.choices[0].text for c in chunks))
    return out


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_the_same_prompt_gives_the_same_tokens_on_every_front(server, oa, kserve, sampling):
    got = every_front_text(server, oa, kserve, sampling)
    assert len(set(got.values())) == 1, got
    assert got["moecluster"][0] == 16


def test_a_chat_gives_the_same_answer_through_moecluster_and_openai(server, oa):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"}]
    with InferenceClient(server.target) as v1:
        want = v1.generate_text(messages=messages, max_tokens=12, **SEEDED).text
    kw = dict(model=server.model_name, messages=messages, max_tokens=12, temperature=0.8, top_p=0.95, seed=7)
    whole = oa.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    streamed = oa.chat.completions.create(**kw, extra_body={"ignore_eos": True}, stream=True)
    assert whole.choices[0].message.content == want
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def test_an_image_request_gives_the_same_answer_on_every_front_that_takes_images(server, oa, kserve):
    with InferenceClient(server.target) as v1:
        chat = [{"role": "user", "content": [{"type": "image", "data": RED}, {"type": "text", "text": QUESTION}]}]
        want_chat = v1.generate_text(messages=chat, max_tokens=10, **GREEDY).text
        want_prompt = v1.generate_text(prompt="<|image|>" + QUESTION, images=[BLUE], max_tokens=10, **GREEDY)
    parts = [{"type": "image_url", "image_url": {"url": data_url(RED)}}, {"type": "text", "text": QUESTION}]
    oa_chat = oa.chat.completions.create(
        model=server.model_name, messages=[{"role": "user", "content": parts}], max_tokens=10, extra_body=GREEDY
    )
    assert oa_chat.choices[0].message.content == want_chat
    inputs = [text_input("<|image|>" + QUESTION), images_input([BLUE])]
    ids, text, _ = kserve_infer(kserve, inputs, max_tokens=10, **GREEDY)
    assert (ids, text) == (list(want_prompt.token_ids), want_prompt.text)
    as_url = [text_input("<|image|>" + QUESTION), images_input([data_url(BLUE).encode()])]
    assert kserve_infer(kserve, as_url, max_tokens=10, **GREEDY)[0] == ids  # a data: URL element too


class TwoStreams:
    """A moecluster.v1 stream and an OpenAI stream, each reading its tokens on a thread."""

    def __init__(self, server, oa):
        self.counts, self.errors = {}, []
        self.threads = [
            threading.Thread(target=self._v1, args=(server,), daemon=True),
            threading.Thread(target=self._oa, args=(server, oa), daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _v1(self, server):
        try:
            with InferenceClient(server.target) as v1:
                self.counts["v1"] = len(v1.generate_text(prompt="count", max_tokens=300, **GREEDY).token_ids)
        except GenerationError as e:
            self.errors.append(e)

    def _oa(self, server, oa):
        try:
            kw = dict(model=server.model_name, prompt="count", max_tokens=300, stream=True, extra_body=GREEDY)
            self.counts["openai"] = list(oa.completions.create(**kw))[-1].usage.completion_tokens
        except Exception as e:  # noqa: BLE001 - the test reports whatever broke the stream
            self.errors.append(e)

    def join(self) -> dict:
        for t in self.threads:
            t.join(120)
        assert not self.errors, self.errors
        return self.counts


def test_bad_input_on_each_front_gets_its_own_error_while_two_streams_go_on(server, kserve):
    streams = TwoStreams(server, openai_client(server))
    url = f"http://127.0.0.1:{server.gateway.http_port}/v1"
    cases = [
        (httpx.post(f"{url}/completions", content=b"{", timeout=30), 400, "body"),
        (httpx.post(f"{url}/completions", json={"model": "x", "prompt": "a"}, timeout=30), 404, "model"),
        (httpx.post(f"{url}/completions", json={"prompt": "a", "temperature": -1}, timeout=30), 400, "temperature"),
    ]
    too_many = [{"type": "image_url", "image_url": {"url": data_url(RED)}} for _ in range(3)]
    body = {"messages": [{"role": "user", "content": too_many}]}
    cases.append((httpx.post(f"{url}/chat/completions", json=body, timeout=30), 400, "messages"))
    for r, status, param in cases:
        assert r.status_code == status and r.json()["error"]["param"].startswith(param), r.text
    for inputs, words in [
        ([], "text_input"),
        ([tensor("text_input", "INT64", np.array([3]))], "inputs[0].datatype"),
        ([text_input("<|image|>" * 3), images_input([RED, BLUE, RED])], "image"),
    ]:
        with pytest.raises(InferenceServerException) as e:
            kserve.infer("", inputs, parameters={"max_tokens": 2})
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and words in e.value.message(), e.value.message()
    with InferenceClient(server.target) as v1, pytest.raises(GenerationError) as e:
        v1.generate_text(prompt="a", max_tokens=2, temperature=-1)
    assert e.value.code.name == "INVALID_ARGUMENT" and "sampling.temperature" in str(e.value)
    assert streams.join() == {"v1": 300, "openai": 300}


def test_prometheus_counts_requests_errors_and_latency_per_front(server):
    samples = scrape(server)  # after the tests above: every front finished requests and refused bad ones

    def count(front, outcome):
        return samples.get(f'moecluster_front_requests_total{{front="{front}",outcome="{outcome}"}}', 0)

    for front in ("moecluster", "kserve", "openai"):
        assert count(front, "length") >= 2 and count(front, "invalid_argument") >= 1, front
        assert samples[f'moecluster_front_request_seconds_count{{front="{front}"}}'] >= 2
        assert samples[f'moecluster_front_time_to_first_token_seconds_count{{front="{front}"}}'] >= 2
    assert count("openai", "not_found") >= 1


def test_a_router_killed_mid_stream_costs_the_http_and_kserve_streams_nothing(server, oa, kserve):
    prompts = [f"count from {i}" for i in range(4)]
    undisturbed = {p: _both(server, oa, kserve, [p])[p] for p in prompts}
    victim = router_pid(server, 0)
    moved_before = _router_failovers(server)
    logs = {(front, p): StreamLog(TOKENS) for front in ("openai", "kserve") for p in prompts}
    results: dict = {}
    runner = threading.Thread(target=lambda: results.update(_both(server, oa, kserve, prompts, logs)), daemon=True)
    runner.start()
    every = list(logs.values())
    # once every stream has a token and tokens left, so that the kill lands while all of them run
    killed = kill_when_ready(
        lambda: ready_to_kill(every), lambda: too_late(every), lambda: os.kill(victim, signal.SIGKILL)
    )
    runner.join(300)
    assert not runner.is_alive(), "the streams hung after the kill"
    assert results == undisturbed
    assert interrupted([log.times for log in every], killed), "the kill did not land between the streams' tokens"
    moved = _router_failovers(server) - moved_before
    assert moved >= 1  # router 0's streams continued on router 1
    samples = scrape(server)
    by_front = [samples.get(f'moecluster_router_failovers_total{{front="{f}"}}', 0) for f in ("openai", "kserve")]
    assert sum(by_front) >= moved


def _router_failovers(server) -> int:
    with InferenceClient(server.target) as client:
        return client.cluster_status().gateway.router_failovers


def _both(server, oa, kserve, prompts, logs: dict | None = None) -> dict:
    """Each prompt's (OpenAI streamed text, KServe streamed tokens and text), all running at once; each stream's
    token arrivals go to logs[(front, prompt)] when given."""
    logs = logs or {}
    stream = KServeStream(kserve, {f"k{i}": logs[("kserve", p)] for i, p in enumerate(prompts) if logs})
    out, oa_text = {}, {}

    def one(p):
        log = logs.get(("openai", p))
        # logprobs=0: every chunk lists the tokens it carries, which the log counts
        kw = dict(model=server.model_name, prompt=p, max_tokens=TOKENS, stream=True, logprobs=0, extra_body=SEEDED)
        text = []
        try:
            for c in oa.completions.create(**kw):
                if c.choices:
                    text.append(c.choices[0].text)
                    if log is not None and c.choices[0].logprobs is not None:
                        log.add(len(c.choices[0].logprobs.tokens))
        finally:
            if log is not None:
                log.done = True
        oa_text[p] = "".join(text)

    threads = [threading.Thread(target=one, args=(p,), daemon=True) for p in prompts]
    for t in threads:
        t.start()
    try:
        for i, p in enumerate(prompts):
            stream.send(f"k{i}", [text_input(p)], max_tokens=TOKENS, **SEEDED)
        kserve_out = {p: stream.collect(f"k{i}", timeout_s=240)[:2] for i, p in enumerate(prompts)}
    finally:
        stream.close()
    for t in threads:
        t.join(240)
    for p in prompts:
        out[p] = (oa_text.get(p), *kserve_out[p])
    return out
