"""Many routers: aggregate tokens/s and inter-token latency through the gRPC gateway at several concurrencies,
with M = 1 (the baseline, measured in the same run) and M = 2, 4 routers in front of the same expert workers;
then what a router's death costs: one router killed (SIGKILL) under load, and the longest gap a client saw
(with M = 1 the streams are held until the replacement router has loaded and joined)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import statistics
import time

import ray

from deploy.bench.models import BENCH_MODELS, bench_checkpoint
from deploy.config import parse_serve_config
from deploy.server import Server
from protos.async_client import AsyncInferenceClient


def run_routers_bench(args) -> int:
    rows, stalls = [], []
    with bench_checkpoint(None, overrides=BENCH_MODELS[args.model]) as model_dir:
        for m in args.routers:
            server = _serve(model_dir, m, args)
            try:
                asyncio.run(_streams(server.target, 2, 8))  # warm-up
                for n in args.concurrency:
                    rows.append((m, n, asyncio.run(_streams(server.target, n, args.tokens))))
                stalls.append((m, _router_failover(server, args)))  # M = 1: held until the replacement joins
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
            "gateway": {"port": 0, "max_concurrent_streams": 4 * max(args.concurrency)},
        }
    )
    return Server(config, show_progress=False).start()


async def _streams(target: str, n: int, tokens: int) -> dict:
    async with AsyncInferenceClient(target) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(_one(client, i, tokens) for i in range(n)))
        wall = time.perf_counter() - start
    gaps = [gap for _, stream_gaps, _ in results for gap in stream_gaps]
    return {
        "tokens_per_s": sum(r[0] for r in results) / wall,
        "itl_ms": 1e3 * statistics.mean(gaps) if gaps else 0.0,
        "max_gap_s": max(gaps, default=0.0),
        "errors": sum(r[2] for r in results),
    }


async def _one(client, i: int, tokens: int) -> tuple[int, list[float], int]:
    times, count = [], 0
    try:
        async for chunk in client.generate(
            input_ids=[1, 5 + i % 200, 9, 40 + i % 200], max_tokens=tokens, temperature=0.0, ignore_eos=True
        ):
            if chunk.token_ids:
                times.append(time.perf_counter())
                count += len(chunk.token_ids)
    except Exception:  # noqa: BLE001 - counted: a failover must not fail a request
        return count, [], 1
    return count, [b - a for a, b in itertools.pairwise(times)], 0


def _router_failover(server: Server, args) -> dict:
    pid = ray.get(server.cluster.routers[0].health.remote(), timeout=30).pid

    async def under_load():
        load = asyncio.create_task(_streams(server.target, max(args.concurrency[0], 8), args.tokens))
        await asyncio.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        return await load

    return asyncio.run(under_load())


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
        print(
            f"router 0 of {routers} killed under load: {m['errors']} failed requests, longest gap between two "
            f"tokens of a stream {m['max_gap_s']:.3f}s, {m['tokens_per_s']:.0f} tokens/s over that run"
        )
