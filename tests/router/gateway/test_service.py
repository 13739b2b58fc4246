"""The gRPC gateway end to end, on a real local Ray (1 router + 2 expert workers) and a real gRPC server: what a
client streams is what the in-process model computes; cancels, deadlines and aborts free the engine's KV
blocks; bad requests are refused with the field named while other streams carry on; limits, health,
reflection and metrics behave as the contract (protos/moecluster/v1/inference.proto) says.

One server for the whole module (a cluster start takes ~10-15 s on a small machine).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from deploy.server import Server
from protos.async_client import AsyncInferenceClient
from protos.client import InferenceClient
from protos.client_types import GenerationError
from router.reference.decode import Generator
from router.request.sampling_params import SamplingParams
from router.request.tokenizer import Tokenizer
from tests.router.gateway.harness import StreamThread, serve_config
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
MAX_MESSAGE = 2**20
GREEDY = dict(temperature=0.0, top_p=1.0, top_k=0, ignore_eos=True)
LONG = dict(GREEDY, max_tokens=1500)  # runs for tens of seconds unless stopped
_wait_for = functools.partial(wait_for, timeout_s=15.0, interval_s=0.05)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    os.environ["RAY_AUTH_MODE"] = "disabled"
    config = serve_config(
        tiny_model_dir,
        cluster={"workers": 2},
        scheduler={"max_num_seqs": 4},
        gateway={
            "max_concurrent_streams": 20,
            "max_queued_requests": 64,
            "max_message_bytes": MAX_MESSAGE,
            "expert_stats_interval_s": 0.5,
            "drain_grace_s": 5.0,
        },
        metrics={"enabled": True, "port": 0, "host": "127.0.0.1"},
    )
    srv = Server(config)
    try:
        srv.start_gateway()
        with InferenceClient(srv.target) as c:
            srv.before_cluster = (c.health_status(""), c.health_status())  # liveness, readiness
        srv.start_cluster()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    gen = Generator.from_checkpoint(tiny_model_dir, dtype="float32")
    return lambda ids, n, **kw: gen.generate(list(ids), SamplingParams(max_tokens=n, **{**GREEDY, **kw})).token_ids


def _engine_idle(client, timeout_s: float = 15.0):
    """The router's status once nothing runs and no KV block is held (or the last one seen)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.cluster_status().router
        if (status.running == 0 and status.waiting == 0 and status.kv_blocks_used == 0) or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def _scrape(server) -> dict[str, float]:
    """The metrics endpoint's samples, by name and labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.gateway.metrics_port}/metrics", timeout=10).read()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.decode().splitlines()
        if line and not line.startswith("#")
    }


def background(client, request_id: str, max_tokens: int) -> StreamThread:
    """A long greedy stream read on a thread."""
    gen = client.generate(input_ids=[1, 40, 41, 42], request_id=request_id, max_tokens=max_tokens, **GREEDY)
    return StreamThread(gen)


# ---- generation ----------------------------------------------------------------------------------------------


def test_streamed_tokens_equal_the_in_process_greedy_result(client, reference):
    prompt = [1, 40, 41, 42, 7, 99, 3]
    gen = client.generate(input_ids=prompt, max_tokens=24, **GREEDY)
    chunks = list(gen)
    assert [t for c in chunks for t in c.token_ids] == reference(prompt, 24)
    assert len(chunks) == 24  # streamed as they were made, one token per step
    assert gen.result.finish_reason == "length"
    assert (gen.result.prompt_tokens, gen.result.completion_tokens) == (len(prompt), 24)
    assert gen.result.text == "".join(c.text for c in chunks)


def test_a_prompt_is_tokenized_like_tokenize_and_generates_like_its_ids(client, tiny_model_dir, reference):
    ids = client.tokenize("12 13 14")
    assert ids == Tokenizer.from_dir(tiny_model_dir).encode("12 13 14")
    result = client.generate_text("12 13 14", max_tokens=8, **GREEDY)
    assert result.token_ids == reference(ids, 8)


def test_chat_messages_are_rendered_with_the_chat_format(client, tiny_model_dir, reference):
    messages = [("system", "count"), ("user", "1 2 3")]
    ids = client.tokenize(messages=messages)
    assert ids[0] == Tokenizer.from_dir(tiny_model_dir).token_id("<|begin_of_text|>")
    assert client.generate_text(messages=messages, max_tokens=6, **GREEDY).token_ids == reference(ids, 6)


def test_unstreamed_generation_is_one_chunk_then_complete(client, reference):
    from protos.moecluster.v1 import inference_pb2 as pb
    from protos.moecluster.v1 import inference_pb2_grpc as pb_grpc

    request = pb.GenerateRequest(
        input_ids=pb.TokenIds(ids=[5, 6, 7]), stream=False, sampling=pb.SamplingParams(max_tokens=10, **GREEDY)
    )
    responses = list(pb_grpc.InferenceStub(client.channel).Generate(request, timeout=60))
    assert [r.WhichOneof("kind") for r in responses] == ["chunk", "complete"]
    assert list(responses[0].chunk.token_ids) == reference([5, 6, 7], 10)
    assert responses[0].request_id  # assigned by the server


def test_logprobs_and_stop_tokens_are_carried(client, reference):
    expected = reference([9, 8, 7], 12)
    stop = expected[5]
    gen = client.generate(
        input_ids=[9, 8, 7], max_tokens=12, logprobs=True, top_logprobs=3, stop_token_ids=[stop], **GREEDY
    )
    chunks = list(gen)
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == expected[: expected.index(stop) + 1]
    assert (gen.result.finish_reason, gen.result.matched_stop) == ("stop", stop)
    for chunk in chunks:
        (lp,) = chunk.logprobs
        assert lp.token_id == chunk.token_ids[0] and len(lp.top) == 3
        assert lp.top[0].token_id == lp.token_id  # greedy: the sampled token is the best one


def test_sixteen_concurrent_streams_each_get_their_own_output(server, reference):
    prompts = [[1, 10 + i, 20 + i, 30 + i] for i in range(16)]

    async def run_all():
        async with AsyncInferenceClient(server.target) as aclient:

            async def one(ids):
                gen = aclient.generate(input_ids=ids, max_tokens=12, **GREEDY)
                tokens = [t async for chunk in gen for t in chunk.token_ids]
                return tokens, gen.result.finish_reason

            return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(run_all())
    for ids, (tokens, reason) in zip(prompts, results):
        assert (tokens, reason) == (reference(ids, 12), "length"), f"prompt {ids}"


def test_a_client_generated_from_the_proto_alone_streams_a_generation(server, tmp_path, reference):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos/moecluster/v1'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "inference.proto",
        ],
        check=True,
    )
    script = tmp_path / "stream.py"
    script.write_text(
        "import json, sys, grpc\n"
        "import inference_pb2 as pb, inference_pb2_grpc as rpc\n"
        "stub = rpc.InferenceStub(grpc.insecure_channel(sys.argv[1]))\n"
        "req = pb.GenerateRequest(input_ids=pb.TokenIds(ids=[4, 5, 6]), stream=True, sampling=pb.SamplingParams(\n"
        "    max_tokens=10, temperature=0, top_p=1, top_k=0, ignore_eos=True))\n"
        "out = [json.loads(__import__('google.protobuf.json_format', fromlist=['x']).MessageToJson(r))\n"
        "       for r in stub.Generate(req, timeout=60)]\n"
        "print(json.dumps(out))\n"
    )
    # a fresh interpreter that sees only the generated modules (not this project) on its path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(script), server.target], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    responses = json.loads(done.stdout)
    tokens = [int(t) for r in responses if "chunk" in r for t in r["chunk"]["tokenIds"]]
    assert tokens == reference([4, 5, 6], 10)
    assert responses[-1]["complete"]["finishReason"] == "FINISH_REASON_LENGTH"


# ---- cancellation --------------------------------------------------------------------------------------------


def test_a_cancel_mid_stream_aborts_the_request_and_frees_its_kv_blocks(client):
    def cancel_after_three_chunks():
        gen = client.generate(input_ids=[1, 2, 3], **LONG)
        chunks = iter(gen)
        for _ in range(3):
            next(chunks)
        assert client.cluster_status().router.kv_blocks_used > 0
        gen.cancel()
        for _ in chunks:
            pass

    _assert_ends_aborted(client, grpc.StatusCode.CANCELLED, cancel_after_three_chunks)


def test_a_deadline_gives_deadline_exceeded_and_the_engine_aborts_the_request(client):
    def read_past_the_deadline():
        for _ in client.generate(input_ids=[1, 2, 3], timeout=1.5, **LONG):
            pass

    _assert_ends_aborted(client, grpc.StatusCode.DEADLINE_EXCEEDED, read_past_the_deadline)


def _assert_ends_aborted(client, code: grpc.StatusCode, read) -> None:
    """`read()`, which reads one long stream, ends in a GenerationError with `code`; then the engine runs nothing,
    holds no KV block and has finished one more request as "abort"."""
    finished_before = client.cluster_status().router.finished.get("abort", 0)
    with pytest.raises(GenerationError) as err:
        read()
    assert err.value.code == code
    status = _engine_idle(client)
    assert (status.running, status.kv_blocks_used) == (0, 0)
    assert status.finished.get("abort", 0) == finished_before + 1


def test_abort_ends_the_named_stream_with_finish_reason_abort(client):
    bg = background(client, "abort-me", 1500)
    _wait_for(lambda: len(bg.tokens) >= 2, what="the stream's first tokens")
    assert client.abort("abort-me", "not-in-flight") == ["abort-me"]
    bg.thread.join(timeout=15)
    assert bg.error is None and bg.gen.result.finish_reason == "abort"
    assert _engine_idle(client).kv_blocks_used == 0


# ---- refusals ------------------------------------------------------------------------------------------------

INVALID = [  # (generate kwargs, the field the message must start with)
    (dict(input_ids=[1], temperature=-1.0), "sampling.temperature"),
    (dict(input_ids=[1], temperature=float("nan")), "sampling.temperature"),
    (dict(input_ids=[1], top_p=1.5), "sampling.top_p: must be in (0, 1], got 1.5"),
    (dict(input_ids=[1], top_k=-1), "sampling.top_k"),
    (dict(input_ids=[1], min_p=2.0), "sampling.min_p"),
    (dict(input_ids=[1], presence_penalty=3.0), "sampling.presence_penalty"),
    (dict(input_ids=[1], frequency_penalty=-3.0), "sampling.frequency_penalty"),
    (dict(input_ids=[1], repetition_penalty=0.0), "sampling.repetition_penalty"),
    (dict(input_ids=[1], max_tokens=0), "sampling.max_tokens"),
    (dict(input_ids=[1], max_tokens=5000), "sampling.max_tokens"),  # beyond the 2048-token context
    (dict(input_ids=[1], max_tokens=4, min_tokens=5), "sampling.min_tokens"),
    (dict(input_ids=[1], seed=2**63), "sampling.seed"),
    (dict(input_ids=[1], top_logprobs=21), "sampling.top_logprobs"),
    (dict(input_ids=[1], stop=[""]), "sampling.stop"),
    (dict(input_ids=[1], stop_token_ids=[10**6]), "sampling.stop_token_ids"),
    (dict(input_ids=[]), "input_ids"),
    (dict(input_ids=[10**6]), "input_ids"),
    (dict(input_ids=[-1]), "input_ids"),
    (dict(prompt=""), "prompt"),
    (dict(messages=[]), "messages"),
    (dict(messages=[("robot", "hi")]), "messages[0].role"),
    (dict(messages=[("user", "a"), ("system", "b")]), "messages[1].role"),
    (dict(), "input"),  # the empty request
    # this checkpoint is text-only: an image is refused naming it
    (dict(messages=[("user", ["look", b"\x89PNG\r\n\x1a\n"])]), "messages[0].parts[1].image: this model does not take"),
    (dict(prompt="<|image|>hi", images=[b"GIF89a"]), "images[0]: this model does not take images"),
]


def test_each_invalid_request_is_refused_naming_its_field_while_another_stream_keeps_going(client, reference):
    # outlives every refusal below even on a fast machine (120 tokens took 0.76 s on one); aborted at the end
    bg = background(client, "keeps-going", 1500)
    _wait_for(lambda: len(bg.tokens) >= 1, what="the background stream's first token")
    failures = []
    for kwargs, field in INVALID:
        try:
            list(client.generate(**kwargs, timeout=30))
            failures.append(f"{kwargs}: accepted")
        except GenerationError as e:
            if e.code != grpc.StatusCode.INVALID_ARGUMENT or not e.message.startswith(field):
                failures.append(f"{kwargs}: {e.code.name} {e.message!r}, expected INVALID_ARGUMENT {field!r}")
    refusals = [
        (dict(input_ids=[1], model="other-model"), grpc.StatusCode.NOT_FOUND, "model"),
        (dict(prompt="x" * (MAX_MESSAGE + 1)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),  # refused by grpc itself
        (dict(input_ids=[1], request_id="keeps-going"), grpc.StatusCode.ALREADY_EXISTS, "request_id"),
    ]
    for kwargs, code, prefix in refusals:
        try:
            list(client.generate(**kwargs, timeout=30))
            failures.append(f"{list(kwargs)}: accepted")
        except GenerationError as e:
            if e.code != code or not e.message.startswith(prefix):
                failures.append(f"{list(kwargs)}: {e.code.name} {e.message[:120]!r}, expected {code.name}")
    assert not failures, "\n".join(failures)
    assert bg.thread.is_alive(), "the background stream should still be running"
    assert client.abort("keeps-going") == ["keeps-going"]
    bg.thread.join(timeout=60)
    assert bg.error is None and bg.gen.result.finish_reason == "abort"
    # undisturbed: every token it streamed is the reference's
    assert len(bg.tokens) >= 1 and bg.tokens == reference([1, 40, 41, 42], len(bg.tokens))


def test_more_open_streams_than_the_limit_are_refused_with_resource_exhausted(server, client):
    with _long_streams_under_a_limit(server, client, "max_concurrent_streams", 3, [f"limit-{i}" for i in range(3)]):
        _wait_for(lambda: client.cluster_status().gateway.active_streams == 3, what="3 open streams")
        _assert_exhausted(client, "3 Generate streams are open (limit 3)")


def test_more_queued_requests_than_the_limit_are_refused_with_resource_exhausted(server, client):
    # the engine runs 4 sequences at once (max_num_seqs=4 above): the 5th and 6th wait
    with _long_streams_under_a_limit(server, client, "max_queued_requests", 2, [f"queue-{i}" for i in range(6)]):
        _wait_for(lambda: client.cluster_status().router.waiting == 2, what="2 waiting requests")
        _wait_for(lambda: _scrape(server)["moecluster_queue_depth"] == 2, what="the gateway to poll the queue")
        _assert_exhausted(client, "2 requests are queued in the engines (limit 2)")


@contextmanager
def _long_streams_under_a_limit(server, client, limit: str, value: int, ids: list[str]):
    """Gateway limit `limit` set to `value` and a long stream open for each of `ids` for the `with` block; then
    the configured limit is back, the streams are aborted, each ends "abort" and every KV block is free."""
    server.gateway.set_limits(**{limit: value})
    open_streams = [background(client, rid, 1500) for rid in ids]
    try:
        yield
    finally:
        server.gateway.set_limits(**{limit: getattr(server.config.gateway, limit)})
        client.abort(*ids)
    for s in open_streams:
        s.thread.join(timeout=15)
    assert all(s.gen.result.finish_reason == "abort" for s in open_streams)
    assert _engine_idle(client).kv_blocks_used == 0


def _assert_exhausted(client, message: str) -> None:
    """A short request is refused with RESOURCE_EXHAUSTED and a message that contains `message`."""
    with pytest.raises(GenerationError) as err:
        list(client.generate(input_ids=[1], max_tokens=2, timeout=30))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert message in err.value.message


# ---- information, health, reflection, metrics ----------------------------------------------------------------


def test_model_info_describes_the_served_model(client, tiny_model_dir):
    info = client.model_info()
    assert (info.name, info.architecture, info.accepts_images) == (
        Path(tiny_model_dir).name,
        "Llama4ForCausalLM",
        False,
    )
    assert (info.num_experts, info.experts_per_token, list(info.moe_layers)) == (16, 1, [0, 1, 2, 3])
    assert (info.num_workers, info.context_length, info.max_top_logprobs) == (2, 2048, 20)


def test_cluster_status_shows_each_expert_on_exactly_the_worker_the_placement_names(client):
    client.generate_text(input_ids=[3, 4, 5], max_tokens=4, **GREEDY)
    status = client.cluster_status()
    assert status.router.ready and status.router.kv_blocks_total > 0 and status.router.steps > 0
    assert [w.index for w in status.workers] == [0, 1]
    for placement in status.placement:
        assert sorted(placement.worker_of_expert) == [0] * 8 + [1] * 8
        for w in status.workers:
            (layer,) = [lay for lay in w.layers if lay.layer == placement.layer]
            assert list(layer.experts) == [e for e, o in enumerate(placement.worker_of_expert) if o == w.index]
    routed = sum(sum(lay.tokens) for w in status.workers for lay in w.layers if lay.layer == 0)
    assert routed > 0


def test_health_was_not_serving_before_the_cluster_and_is_serving_now(server, client):
    assert server.before_cluster == ("SERVING", "NOT_SERVING")  # liveness, readiness
    assert (client.health_status(""), client.health_status()) == ("SERVING", "SERVING")


def test_reflection_lists_the_inference_and_health_services(client):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    services = ProtoReflectionDescriptorDatabase(client.channel).get_services()
    assert {"moecluster.v1.Inference", "grpc.health.v1.Health"} <= set(services)


def test_metrics_count_requests_tokens_latency_and_expert_load(server, client):
    client.generate_text(input_ids=[3, 4, 5], max_tokens=5, **GREEDY)
    with pytest.raises(GenerationError):
        client.generate_text(input_ids=[3], top_p=7.0)

    _wait_for(
        lambda: any(k.startswith("moecluster_expert_tokens{") and v > 0 for k, v in _scrape(server).items()),
        what="expert token gauges",
    )
    m = _scrape(server)
    assert m['moecluster_requests_total{outcome="length"}'] >= 1
    assert m["moecluster_completion_tokens_total"] >= 5 and m["moecluster_prompt_tokens_total"] >= 3
    assert m["moecluster_time_to_first_token_seconds_count"] >= 1
    assert m["moecluster_inter_token_latency_seconds_count"] >= 4
    assert m['moecluster_requests_total{outcome="invalid_argument"}'] >= 1
    for gauge in ("moecluster_queue_depth", "moecluster_running_requests", "moecluster_kv_cache_usage_ratio"):
        assert gauge in m
    layers = {k.split('layer="')[1].split('"')[0] for k in m if k.startswith("moecluster_expert_tokens{")}
    assert layers == {"0", "1", "2", "3"}
