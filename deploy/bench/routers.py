"""Many routers: aggregate tokens/s and inter-token latency through the gRPC gateway at several concurrencies,
with M = 1 (the baseline, measured in the same run) and M = 2, 4 routers in front of the same expert workers;
then what a router's death costs: one router killed (SIGKILL) under load, and the longest gap a client saw
(with M = 1 the streams are held until the replacement router has loaded and joined).

The kill lands while every stream generates (deploy/bench/interruption.py): the requests are sized from the rate
just measured to last FAILOVER_LOAD_S undisturbed, router 0 is killed once every stream has a token and tokens
left, and the row says "kill landed after the load" instead of a gap when a stream got no token on either side."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import statistics
import time

import ray

from deploy.bench.interruption import AFTER_LOAD, StreamLog, interrupted, kill_when_ready_async, ready_to_kill, too_late
from deploy.bench.models import BENCH_MODELS, bench_checkpoint
from deploy.config import parse_serve_config
from deploy.server import Server
from protos.async_client import AsyncInferenceClient

FAILOVER_STREAMS = 8  # at least; or the first --concurrency if larger
FAILOVER_LOAD_S = 3.0  # how long each failover request would take undisturbed, at the rate measured before it
MAX_TOKENS = 2000  # within the bench models' context (2048) with the 4-token prompts


def run_routers_bench(args) -> int:
    rows, stalls = [], []
    with bench_checkpoint(None, overrides=BENCH_MODELS[args.model]) as model_dir:
        for m in args.routers:
            server = _serve(model_dir, m, args)
            try:
                asyncio.run(_streams(server.target, 2, 8))  # warm-up
                for n in args.concurrency:
                    rows.append((m, n, asyncio.run(_streams(server.target, n, args.tokens))))
                n, tokens = failover_load(rows[-len(args.concurrency) :], args.tokens)
                stalls.append((m, router_failover(server, n, tokens)))  # M = 1: held until the replacement joins
            finally:
                server.stop(grace_s=2.0)
    _print(rows, stalls, args)
    return 0


def _serve(model_dir: str, routers: int, args) -> Server:
    config = parse_serve_config(
        {
            "model": {"path": model_dir},
            "cluster": {"routers": routers, "workers": args.workers},
            "scheduler": {"max_num_seqs": max(args.concurrency)},
            "gateway": {"port": 0, "http_port": 0, "max_concurrent_streams": 4 * max(args.concurrency)},
        }
    )
    return Server(config, show_progress=False).start()


async def _streams(target: str, n: int, tokens: int, logs: list[StreamLog] | None = None) -> dict:
    logs = logs or [StreamLog(tokens) for _ in range(n)]
    async with AsyncInferenceClient(target) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(_one(client, i, logs[i]) for i in range(n)))
        wall = time.perf_counter() - start
    gaps = [gap for _, stream_gaps, _ in results for gap in stream_gaps]
    return {
        "tokens_per_s": sum(r[0] for r in results) / wall,
        "itl_ms": 1e3 * statistics.mean(gaps) if gaps else 0.0,
        "max_gap_s": max(gaps, default=0.0),
        "errors": sum(r[2] for r in results),
    }


async def _one(client, i: int, log: StreamLog) -> tuple[int, list[float], int]:
    try:
        async for chunk in client.generate(
            input_ids=[1, 5 + i % 200, 9, 40 + i % 200], max_tokens=log.max_tokens, temperature=0.0, ignore_eos=True
        ):
            log.add(len(chunk.token_ids))
    except Exception:  # noqa: BLE001 - counted: a failover must not fail a request
        return log.tokens, [], 1
    finally:
        log.done = True
    return log.tokens, [b - a for a, b in itertools.pairwise(log.times)], 0


def failover_load(rows: list[tuple[int, int, dict]], tokens: int) -> tuple[int, int]:
    """(streams, tokens per request) for the failover run: FAILOVER_STREAMS or more, each request long enough to
    last FAILOVER_LOAD_S at the per-stream rate just measured (the nearest concurrency), and never below --tokens."""
    n = max(rows[0][1], FAILOVER_STREAMS)
    _, near, measured = min(rows, key=lambda row: abs(row[1] - n))
    per_stream = measured["tokens_per_s"] / near
    return n, min(MAX_TOKENS, max(tokens, int(per_stream * FAILOVER_LOAD_S)))


def router_failover(server: Server, n: int, tokens: int, when=None) -> dict:
    """`n` streams of `tokens`; router 0 SIGKILLed once every stream generates with tokens left (or, given `when`,
    once `when(logs)`); the run's figures, the kill's verdict ("interrupted") and the load's shape."""
    pid = ray.get(server.cluster.routers[0].health.remote(), timeout=30).pid
    logs = [StreamLog(tokens) for _ in range(n)]
    ready, late = (ready_to_kill, too_late) if when is None else (when, lambda _: False)

    async def under_load():
        load = asyncio.create_task(_streams(server.target, n, tokens, logs))
        kill = lambda: os.kill(pid, signal.SIGKILL)  # noqa: E731
        killed = await kill_when_ready_async(lambda: ready(logs), lambda: late(logs), kill)
        return killed, await load

    killed, result = asyncio.run(under_load())
    return {**result, "interrupted": interrupted([log.times for log in logs], killed), "streams": n, "tokens": tokens}


def _print(rows, stalls, args) -> None:
    base = {n: m for routers, n, m in rows if routers == 1}
    print(
        f"routers: model {args.model}, {args.workers} expert workers on cpu ({os.cpu_count()} cores), "
        f"{args.tokens} greedy tokens per request, through the gRPC gateway"
    )
    header = ("routers", "concurrent", "tokens/s", "vs 1 router", "mean ITL ms", "failed")
    table = [header] + [
        (
            str(routers),
            str(n),
            f"{m['tokens_per_s']:.0f}",
            f"{m['tokens_per_s'] / base[n]['tokens_per_s']:.2f}x",
            f"{m['itl_ms']:.1f}",
            str(m["errors"]),
        )
        for routers, n, m in rows
    ]
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    for r in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))
    for routers, m in stalls:
        print(failover_row(routers, m))


def failover_row(routers: int, m: dict) -> str:
    """The failover's line: its stall figures, or AFTER_LOAD when the kill did not interrupt every stream."""
    load = f"{m['streams']} streams of {m['tokens']} tokens"
    if not m["interrupted"]:
        return f"router 0 of {routers} killed: {AFTER_LOAD} ({load}), no stall measured; {m['errors']} failed requests"
    return (
        f"router 0 of {routers} killed under load ({load}): {m['errors']} failed requests, longest gap between two "
        f"tokens of a stream {m['max_gap_s']:.3f}s, {m['tokens_per_s']:.0f} tokens/s over that run"
    )
