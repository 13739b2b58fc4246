"""KServe v2 gRPC end to end, driven by tritonclient (Triton's own client) against a real server, on the same port as
moecluster.v1: liveness, readiness, metadata and config; ModelInfer; ModelStreamInfer with one response per delta
and triton_final_response, several requests on one stream, errors in error_message while the stream goes on;
refusals with their status code; a cancelled ModelInfer and a cancelled stream free their KV blocks.

One server for the module (1 router, 2 expert workers)."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from protos.client import InferenceClient
from tests.router.gateway.fronts import (
    GREEDY,
    KServeStream,
    engine_idle,
    ids_input,
    kserve_infer,
    serve,
    tensor,
    text_input,
    wait_running,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    srv = serve(tiny_model_dir)
    yield srv
    srv.stop(grace_s=2.0)


@pytest.fixture
def client(server):
    c = triton.InferenceServerClient(server.target)
    yield c
    c.close()


def test_health_metadata_and_config(client, server):
    name = server.model_name
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(name) and client.is_model_ready("") and not client.is_model_ready("other")
    meta = client.get_server_metadata()
    assert meta.name == "moecluster" and "model_stream_infer" in meta.extensions
    model = client.get_model_metadata(name)
    assert {t.name: t.datatype for t in model.inputs}["text_input"] == "BYTES"
    assert {t.name for t in model.outputs} == {"text_output", "output_ids"}
    config = client.get_model_config(name).config
    assert config.name == name and config.model_transaction_policy.decoupled
    (index,) = client.get_model_repository_index().models
    assert (index.name, index.version, index.state) == (name, "1", "READY")
    assert {i.name for i in config.input} >= {"text_input", "input_ids", "max_tokens"}
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("other")
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_model_infer_gives_the_tokens_of_moecluster_v1(client, server):
    with InferenceClient(server.target) as v1:
        want = v1.generate_text(prompt="count from 7", max_tokens=10, **GREEDY)
    ids, text, params = kserve_infer(client, [text_input("count from 7")], max_tokens=10, **GREEDY)
    assert (ids, text) == (list(want.token_ids), want.text)
    assert params["finish_reason"] == "length" and params["completion_tokens"] == 10
    max_tokens = triton.InferInput("max_tokens", [1], "INT32")
    max_tokens.set_data_from_numpy(np.array([10], dtype=np.int32))
    with InferenceClient(server.target) as v1:
        want_ids = v1.generate_text(input_ids=[1, 5, 9, 13], max_tokens=10, **GREEDY).token_ids
    ids32, _, _ = kserve_infer(client, [ids_input([1, 5, 9, 13], "INT32"), max_tokens], **GREEDY)
    assert ids32 == list(want_ids)  # token input, max_tokens as a tensor


def test_stream_one_response_per_delta_then_the_final_one(client):
    stream = KServeStream(client)
    try:
        stream.send("a", [text_input("count from 7")], max_tokens=6, **GREEDY)
        stream.send("b", [text_input("count from 9")], max_tokens=4, temperature=0.7, seed=5, ignore_eos=True)
        a_ids, a_text, a_final, a_n = stream.collect("a")
        b_ids, _, b_final, b_n = stream.collect("b")
    finally:
        stream.close()
    assert (len(a_ids), a_n, a_final["finish_reason"]) == (6, 7, "length")  # 6 deltas + the final response
    assert (len(b_ids), b_n, b_final["completion_tokens"]) == (4, 5, 4)
    assert kserve_infer(client, [text_input("count from 7")], max_tokens=6, **GREEDY)[:2] == (a_ids, a_text)
    seeded = dict(max_tokens=4, temperature=0.7, seed=5, ignore_eos=True)
    assert kserve_infer(client, [text_input("count from 9")], **seeded)[0] == b_ids


def test_stream_false_gives_one_whole_response(client):
    stream = KServeStream(client)
    try:
        stream.send("w", [text_input("count")], max_tokens=5, stream=False, **GREEDY)
        ids, _, final, n = stream.collect("w")
    finally:
        stream.close()
    assert (len(ids), n, final["completion_tokens"]) == (5, 1, 5)


@pytest.mark.parametrize(
    "inputs, params, words",
    [
        (lambda: [], {}, ["text_input"]),
        (lambda: [ids_input([1, 2], "INT64")], {"temperature": -1.0}, ["parameters.temperature"]),
        (lambda: [tensor("text_input", "INT32", np.array([1], dtype=np.int32))], {}, ["inputs[0].datatype", "BYTES"]),
        (lambda: [tensor("prompt", "BYTES", np.array([b"x"], dtype=object))], {}, ["inputs[0].name", "text_input"]),
        (lambda: [text_input("x"), ids_input([1])], {}, ["not both"]),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(client, inputs, params, words):
    with pytest.raises(InferenceServerException) as e:
        client.infer("", inputs(), parameters={"max_tokens": 2, **params})
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and all(w in e.value.message() for w in words), e.value


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(InferenceServerException) as e:
        client.infer("other", [text_input("x")], parameters={"max_tokens": 2})
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_an_error_on_the_stream_is_an_error_message_and_the_stream_goes_on(client):
    stream = KServeStream(client)
    try:
        stream.send("long", [text_input("count")], max_tokens=40, **GREEDY)
        stream.send("bad", [text_input("x")], max_tokens=2, temperature=-1.0)
        error = stream.errors.get(timeout=60)
        assert "INVALID_ARGUMENT" in str(error) and "parameters.temperature" in str(error)
        stream.send("after", [text_input("count")], max_tokens=3, **GREEDY)
        assert len(stream.collect("long")[0]) == 40 and len(stream.collect("after")[0]) == 3
    finally:
        stream.close()


def test_a_cancelled_model_infer_frees_its_kv_blocks(client, server):
    done: queue.Queue = queue.Queue()
    params = {"max_tokens": 1500, **GREEDY}
    call = client.async_infer("", [text_input("count")], lambda result, error: done.put(error), parameters=params)
    wait_running(server)
    call.cancel()
    assert "CANCELLED" in str(done.get(timeout=30))
    assert engine_idle(server)


def test_a_cancelled_stream_aborts_its_requests_and_frees_their_kv_blocks(server):
    with InferenceClient(server.target) as v1:
        aborted = v1.cluster_status().router.finished.get("abort", 0)
    client = triton.InferenceServerClient(server.target)
    stream = KServeStream(client)
    for i in range(3):
        stream.send(f"c{i}", [text_input(f"count {i}")], max_tokens=1500, **GREEDY)
    wait_running(server, 3)
    closer = threading.Thread(target=stream.close, kwargs={"cancel": True}, daemon=True)
    closer.start()
    closer.join(30)
    client.close()
    assert engine_idle(server)
    time.sleep(0.2)
    with InferenceClient(server.target) as v1:  # the stream's requests were aborted, and the server serves on
        assert v1.cluster_status().router.finished.get("abort", 0) == aborted + 3
        assert len(v1.generate_text(prompt="x", max_tokens=3, **GREEDY).token_ids) == 3
