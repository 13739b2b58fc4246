"""Many routers behind one gateway, as gRPC clients see them: M = 2 gives every stream the tokens M = 1 gives
(greedy and seeded); new requests spread over both routers; a router killed (SIGKILL) under 8 streams costs no
stream a token, with M = 2 and with M = 1 (the streams wait for its replacement); cancels and deadlines reach
the request's router and every KV block comes back; a worker's death with M = 2 costs nothing either. Every test
ends with no Ray process left. A kill comes once every stream has a token and tokens left, and the test checks that
every stream got tokens before and after it."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import grpc
import pytest

from deploy.bench.interruption import StreamLog, interrupted, kill_when_ready, ready_to_kill, too_late
from deploy.server import Server
from protos.client import InferenceClient
from protos.client_types import GenerationError
from tests.procs import pid_of
from tests.router.gateway.harness import router_pid, serve_config, start_streams

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_ray_left")]


def serve(model_dir, routers: int, workers: int = 2) -> Server:
    config = serve_config(model_dir, cluster={"routers": routers, "workers": workers}, scheduler={"max_num_seqs": 16})
    return Server(config, show_progress=False).start()


def sampling(i: int) -> dict:
    return {"temperature": 0.0} if i % 2 else {"temperature": 0.8, "top_p": 0.95, "seed": 1000 + i}


def run_streams(target: str, n: int, logs: list[StreamLog], results: dict, errors: list) -> list[threading.Thread]:
    requests = [
        dict(input_ids=[1, 9 + i, 3, 50 + i], max_tokens=logs[i].max_tokens, ignore_eos=True, **sampling(i))
        for i in range(n)
    ]
    return start_streams(target, requests, results, errors, logs)


def collect(target: str, n: int, tokens: int, kill: int | None = None) -> dict[int, list[int]]:
    """n streams' tokens; with `kill` (a pid), SIGKILLed once every stream has a token and tokens left (however
    fast the engine is: a fixed delay can land after the last token), and checked to have come between tokens."""
    results, errors, logs = {}, [], [StreamLog(tokens) for _ in range(n)]
    threads = run_streams(target, n, logs, results, errors)
    if kill is not None:
        killed = kill_when_ready(
            lambda: ready_to_kill(logs), lambda: too_late(logs), lambda: os.kill(kill, signal.SIGKILL)
        )
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == n
    if kill is not None:
        assert interrupted([log.times for log in logs], killed), "the kill did not land while every stream ran"
    return results


@pytest.fixture(scope="module")
def one_router_tokens(tiny_model_dir):
    server = serve(tiny_model_dir, routers=1)
    try:
        return collect(server.target, 16, 48)
    finally:
        server.stop(grace_s=2.0)


def test_two_routers_give_every_stream_the_tokens_of_one_and_share_the_load(tiny_model_dir, one_router_tokens):
    server = serve(tiny_model_dir, routers=2)
    try:
        assert collect(server.target, 16, 48) == one_router_tokens
        with InferenceClient(server.target) as client:
            status = client.cluster_status()
        assert [r.index for r in status.routers] == [0, 1]
        served = [sum(r.finished.values()) for r in status.routers]
        assert sum(served) == 16 and min(served) >= 4, served  # spread by load, not all on one
    finally:
        server.stop(grace_s=2.0)


@pytest.mark.parametrize("routers", [2, 1])
def test_a_killed_router_costs_no_stream_a_token(tiny_model_dir, one_router_tokens, routers):
    server = serve(tiny_model_dir, routers=routers)
    try:
        undisturbed = {i: one_router_tokens[i] for i in range(8)}
        victim = router_pid(server, 0)
        got = collect(server.target, 8, 48, kill=victim)
        assert got == undisturbed
        deadline = time.monotonic() + 120
        with InferenceClient(server.target) as client:
            # with M = 2 the streams may finish on the other router before the supervisor marks this one dead
            while (r := client.cluster_status().routers[0]).state != "serving" or not r.replacements:
                assert time.monotonic() < deadline, "the router was never replaced"
                time.sleep(0.3)
            status = client.cluster_status()
            assert status.routers[0].replacements == 1 and status.routers[0].ready
            assert collect(server.target, 8, 48) == undisturbed  # and it serves again
    finally:
        server.stop(grace_s=2.0)


def test_cancel_and_deadline_reach_the_requests_router_and_free_its_blocks(tiny_model_dir):
    server = serve(tiny_model_dir, routers=2)
    try:
        with InferenceClient(server.target) as client:
            gens = [
                client.generate(input_ids=[1, 2, 3 + i], max_tokens=1500, ignore_eos=True, temperature=0.0)
                for i in range(4)
            ]
            readers = []
            for gen in gens:
                it = iter(gen)
                next(it)  # streaming: placed and running
                readers.append(it)
            for gen in gens:
                gen.cancel()
            with pytest.raises(GenerationError) as late:
                client.generate_text(input_ids=[1, 2, 3], max_tokens=1500, ignore_eos=True, timeout=1.0)
            assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            deadline = time.monotonic() + 30
            while any(r.kv_blocks_used or r.running for r in client.cluster_status().routers):
                assert time.monotonic() < deadline, [
                    (r.kv_blocks_used, r.running) for r in client.cluster_status().routers
                ]
                time.sleep(0.2)
            aborted = sum(r.finished.get("abort", 0) for r in client.cluster_status().routers)
            assert aborted == 5
    finally:
        server.stop(grace_s=2.0)


def test_a_worker_killed_under_two_routers_costs_nothing(tiny_model_dir, one_router_tokens):
    server = serve(tiny_model_dir, routers=2)
    try:
        victim = pid_of(server.cluster.workers[1])
        got = collect(server.target, 8, 48, kill=victim)
        assert got == {i: one_router_tokens[i] for i in range(8)}
        with InferenceClient(server.target) as client:
            deadline = time.monotonic() + 60
            while client.cluster_status().workers[1].state != "serving":
                assert time.monotonic() < deadline
                time.sleep(0.3)
            status = client.cluster_status()
        assert list(status.expert_plane.members) == [0, 1] and status.expert_plane.failovers >= 1
    finally:
        server.stop(grace_s=2.0)


def test_cache_affinity_keeps_each_conversation_on_its_router_and_spreads_the_conversations(tiny_model_dir):
    """8 chats at once behind one 400-token system prompt, 3 turns each (the whole history every turn): every later
    turn reuses its own history (so it ran where the previous turn ran: no other router saw that history), and both
    routers serve conversations."""
    server = serve(tiny_model_dir, routers=2)
    rng = random.Random(5)
    system = [rng.randrange(3, 300) for _ in range(400)]
    cached: dict[tuple[int, int], tuple[int, int]] = {}  # (user, turn) -> (cached tokens, previous turn's tokens)

    def chat(user: int) -> None:
        history, previous = list(system), 0
        with InferenceClient(server.target) as client:
            for turn in range(3):
                history += [rng.randrange(3, 300) for _ in range(100)]
                result = client.generate_text(input_ids=history, max_tokens=16, temperature=0.0, ignore_eos=True)
                cached[user, turn] = (result.cached_tokens, previous)
                history += result.token_ids
                previous = len(history)

    try:
        threads = [threading.Thread(target=chat, args=(u,), daemon=True) for u in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert len(cached) == 24
        chunk = 64  # the tiny model's attention chunk: a hit may fall back to the start of the chunk it ends in
        moved = {k: v for k, v in cached.items() if k[1] > 0 and not v[0] >= v[1] - chunk > len(system)}
        assert not moved, moved
        with InferenceClient(server.target) as client:
            routers = client.cluster_status().routers
        served = [sum(r.finished.values()) for r in routers]
        assert sum(served) == 24 and min(served) >= 3, served  # at least one whole conversation each
        assert all(r.prefix_caching and r.prefix_hit_rate > 0.5 for r in routers), routers
    finally:
        server.stop(grace_s=2.0)
