"""Structured output and tool calls through gRPC, on a real local cluster (2 routers, 2 expert workers): a named tool
choice streams a call whose arguments validate, argument by argument, with finish reason TOOL_CALLS and the call in
Complete; JSON-schema output validates; a bad constraint or tool is INVALID_ARGUMENT naming its field; seeded
constrained streams (JSON, and calls in parts) continue exactly, and still validate, when their router is killed and
when a worker is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import grpc
import jsonschema
import pytest

from deploy.bench.interruption import StreamLog, interrupted, kill_when_ready, ready_to_kill, too_late
from protos.client import InferenceClient
from protos.client_types import GenerationError
from protos.moecluster.v1 import inference_pb2 as pb
from protos.moecluster.v1 import inference_pb2_grpc as pb_grpc
from tests.procs import pid_of
from tests.router.gateway.harness import router_pid
from tests.router.gateway.test_routers import serve
from tests.waiting import wait_for

pytestmark = pytest.mark.slow  # one server for the module (its teardown stops every process it started)

ALARM = {
    "type": "object",
    "properties": {
        "hour": {"type": "integer", "minimum": 0, "maximum": 23},
        "days": {"type": "array", "items": {"enum": ["mon", "tue", "wed"]}, "minItems": 1, "maxItems": 3},
        "label": {"type": "string", "maxLength": 8},
    },
    "required": ["hour", "days", "label"],
}
LONG = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 40, "maxItems": 40}
TEN = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 10, "maxItems": 10}
TALLY = {"type": "object", "properties": {k: TEN for k in "abcd"}, "required": list("abcd")}  # 4 parts mid-stream


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    srv = serve(tiny_model_dir, routers=2)
    try:
        yield srv
    finally:
        srv.stop(grace_s=2.0)


def generate(target: str, request: pb.GenerateRequest, log: StreamLog | None = None, out: dict | None = None) -> dict:
    """Every chunk's tokens, text, calls and call parts, and the Complete, in `out` as they arrive; the tokens'
    arrivals go to `log`."""
    out = {} if out is None else out
    out.update(tokens=[], text="", calls=[], parts=[], complete=None)
    try:
        with grpc.insecure_channel(target) as channel:
            for msg in pb_grpc.InferenceStub(channel).Generate(request, timeout=300):
                if msg.HasField("chunk"):
                    out["tokens"] += msg.chunk.token_ids
                    out["text"] += msg.chunk.text
                    out["calls"] += msg.chunk.tool_calls
                    out["parts"] += msg.chunk.tool_call_parts
                    if log is not None:
                        log.add(len(msg.chunk.token_ids))
                elif msg.HasField("complete"):
                    out["complete"] = msg.complete
    finally:
        if log is not None:
            log.done = True
    return out


def tally_request(seed: int) -> pb.GenerateRequest:
    """A call constrained to the `tally` tool: it streams in parts, argument by argument."""
    return pb.GenerateRequest(
        messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Tally these up")]),
        sampling=pb.SamplingParams(temperature=1.0, seed=seed, max_tokens=300),
        tools=[pb.Tool(name="tally", description="Record four tallies", parameters=json.dumps(TALLY))],
        tool_choice=pb.ToolChoice(function="tally"),
        stream=True,
    )


def json_request(seed: int, schema: dict) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=1.0, seed=seed, max_tokens=200, json_schema=json.dumps(schema))
    return pb.GenerateRequest(prompt="Numbers: ", sampling=sampling, stream=True)


def test_a_named_tool_choice_streams_a_call_whose_arguments_validate(server):
    tools = [
        pb.Tool(name="set_alarm", description="Set an alarm", parameters=json.dumps(ALARM)),
        pb.Tool(name="note", description="Write a note", parameters='{"type": "object", "properties": {}}'),
    ]
    for seed in range(3):
        request = pb.GenerateRequest(
            messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Wake me at 7 on Mondays")]),
            sampling=pb.SamplingParams(temperature=1.0, seed=seed, max_tokens=120),
            tools=tools,
            tool_choice=pb.ToolChoice(function="set_alarm"),
            stream=True,
        )
        out = generate(server.target, request)
        assert out["complete"].finish_reason == pb.FINISH_REASON_TOOL_CALLS and out["text"] == ""
        (call,) = out["calls"]
        assert call.name == "set_alarm" and list(out["complete"].tool_calls) == [call]
        jsonschema.validate(json.loads(call.arguments), ALARM)
        # it also streamed as it was written, argument by argument, in chunks before the last
        parts = out["parts"]
        assert (parts[0].index, parts[0].id, parts[0].name) == (0, call.id, "set_alarm") and len(parts) >= 5
        assert "".join(p.arguments for p in parts) == call.arguments


def test_the_command_line_client_sends_a_schema_and_a_logit_bias(server, tmp_path):
    (tmp_path / "alarm.json").write_text(json.dumps(ALARM))
    cmd = [sys.executable, "-m", "deploy.cli", "client", "generate", "--target", server.target, "Set an alarm: "]
    cmd += ["--json-schema", f"@{tmp_path / 'alarm.json'}", "--temperature", "1", "--seed", "4", "--max-tokens", "120"]
    done = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["finish_reason"] == "stop"
    jsonschema.validate(json.loads(out["text"]), ALARM)
    forced = [sys.executable, "-m", "deploy.cli", "client", "generate", "--target", server.target, "--input-ids", "1,2"]
    forced += ["--logit-bias", "7=100", "--max-tokens", "3", "--temperature", "0", "--ignore-eos", "--json"]
    done = subprocess.run(forced, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["token_ids"] == [7, 7, 7]


def test_the_python_client_sends_tools_and_sees_the_call_stream_in_parts(server):
    tools = [{"name": "set_alarm", "description": "Set an alarm", "parameters": ALARM}]
    messages = [{"role": "user", "content": "Wake me at 7 on Mondays"}]
    with InferenceClient(server.target) as client:
        gen = client.generate(messages=messages, tools=tools, tool_choice="required", temperature=1.0, seed=2)
        chunks = list(gen)
        (call,) = gen.result.tool_calls
    assert gen.result.finish_reason == "tool_calls" and call.name == "set_alarm"
    parts = [p for c in chunks for p in c.tool_call_parts]
    assert parts[0].name == "set_alarm" and "".join(p.arguments for p in parts) == call.arguments
    assert [c for chunk in chunks for c in chunk.tool_calls] == [call]
    jsonschema.validate(json.loads(call.arguments), ALARM)
    with InferenceClient(server.target) as client, pytest.raises(GenerationError) as e:
        client.generate_text(messages=messages, tools=tools, tool_choice="set_clock")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.message.startswith("tool_choice")


def test_json_schema_output_validates_and_bad_constraints_name_their_field(server):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"]}
    out = generate(server.target, json_request(5, schema))
    assert out["complete"].finish_reason == pb.FINISH_REASON_STOP
    jsonschema.validate(json.loads(out["text"]), schema)
    bad = [
        (pb.SamplingParams(json_schema="{nope"), "sampling.json_schema"),
        (pb.SamplingParams(regex="(open"), "sampling.regex"),
        (pb.SamplingParams(choice=pb.Choice(options=[])), "sampling.choice"),
    ]
    for sampling, field in bad:
        with pytest.raises(grpc.RpcError) as e:
            generate(server.target, pb.GenerateRequest(prompt="x", sampling=sampling))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field)
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    with pytest.raises(grpc.RpcError) as e:
        generate(server.target, pb.GenerateRequest(messages=chat, tools=[pb.Tool(name="bad name")]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("tools[0].name")


def streams(
    target: str, n: int, lengths: dict[int, int] | None = None, kill=None, tag: str = "", parts: int = 0
) -> dict[int, dict]:
    """n seeded constrained streams at once: JSON (even i) and tool calls streamed in parts (odd i), with request ids
    `<tag>-<i>`. With `kill(results)` and each stream's `lengths` (its tokens, from an undisturbed run: a constrained
    stream ends before max_tokens), the kill comes once every stream has a token and tokens left and each call
    stream has `parts` parts, and is checked to have landed between every stream's tokens."""
    results, errors = {i: {"parts": []} for i in range(n)}, []
    logs = [StreamLog(lengths[i] if lengths else 300) for i in range(n)]

    def one(i):
        try:
            request = tally_request(100 + i) if i % 2 else json_request(100 + i, LONG)
            request.request_id = f"{tag}-{i}" if tag else ""
            generate(target, request, logs[i], results[i])
        except grpc.RpcError as e:
            errors.append(e)

    def ready() -> bool:
        return ready_to_kill(logs) and all(len(results[i]["parts"]) >= parts for i in range(1, n, 2))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    if kill is not None:
        killed = kill_when_ready(ready, lambda: too_late(logs), kill)
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    assert not errors, errors
    if kill is not None:
        assert interrupted([log.times for log in logs], killed), "the kill did not land between the streams' tokens"
    return results


def calls_of(out: dict) -> tuple[list, list]:
    """A stream's call parts and whole calls, less their ids (each request has an id of its own)."""
    return [(p.index, p.name, p.arguments) for p in out["parts"]], [(c.name, c.arguments) for c in out["calls"]]


def test_seeded_constrained_streams_continue_exactly_through_router_and_worker_deaths(server):
    undisturbed = streams(server.target, 6)
    for i, out in undisturbed.items():
        if i % 2:
            (call,) = out["calls"]
            jsonschema.validate(json.loads(call.arguments), TALLY)
            assert "".join(p.arguments for p in out["parts"]) == call.arguments and len(out["parts"]) == 6
        else:
            jsonschema.validate(json.loads(out["text"]), LONG)
    lengths = {i: len(out["tokens"]) for i, out in undisturbed.items()}
    routers, relays = [router_pid(server, r) for r in range(2)], server.gateway.service.streams

    def kill_the_router_of_call_1():  # once it has streamed its name and first argument: the rest must not repeat
        os.kill(routers[relays["r-1"].router.index], signal.SIGKILL)

    with InferenceClient(server.target) as client:
        moved = client.cluster_status().gateway.router_failovers
        after_router = streams(server.target, 6, lengths, kill=kill_the_router_of_call_1, tag="r", parts=2)
        moved = client.cluster_status().gateway.router_failovers - moved
        deaths = client.cluster_status().expert_plane.worker_deaths
        worker = pid_of(server.cluster.workers[1])
        after_worker = streams(server.target, 6, lengths, kill=lambda: os.kill(worker, signal.SIGKILL), tag="w")
        wait_for(
            lambda: client.cluster_status().expert_plane.worker_deaths == deaths + 1, 30, "the worker's death counted"
        )
    assert moved >= 1  # the killed router's streams continued on the other
    for got in (after_router, after_worker):
        assert {i: o["tokens"] for i, o in got.items()} == {i: o["tokens"] for i, o in undisturbed.items()}
        assert {i: o["text"] for i, o in got.items()} == {i: o["text"] for i, o in undisturbed.items()}
        # the calls' parts too: none sent twice or lost when the stream moved to another router
        assert {i: calls_of(o) for i, o in got.items()} == {i: calls_of(o) for i, o in undisturbed.items()}
        assert all(o["parts"][0].id == o["calls"][0].id for i, o in got.items() if i % 2)
