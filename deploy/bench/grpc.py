"""Latency through the gateway's fronts beside the engine called directly (router.generate_stream over Ray from
this process, no gateway), same server, same run, rounds interleaved: time to first token and inter-token
latency for 1 and N concurrent streams. The difference is what the gateway costs (admission, validation,
protobuf, HTTP/2, one more event loop). `--front` picks the fronts, each driven by its own client library in a
client process of its own, as real clients are (deploy/bench/front_clients.py): moecluster
(protos.async_client), kserve (tritonclient.grpc.aio, ModelStreamInfer) and openai (the openai SDK's AsyncOpenAI,
streamed completions). Several `--workers` counts run one server each, in the same run, so the
expert workers' cost reads off the same table (0: every expert in the router)."""

from __future__ import annotations

import asyncio
import functools
import statistics
import uuid

import torch

from deploy.bench.front_clients import FrontClients, timed
from deploy.bench.models import BENCH_MODELS, bench_checkpoint
from deploy.config import apply_overrides, load_serve_config
from deploy.server import Server
from protos.client import InferenceClient
from router.request.messages import Delta, EngineRequest
from router.request.sampling_params import SamplingParams


def run_grpc_bench(args) -> int:
    with bench_checkpoint(args.model, BENCH_MODELS[args.bench_model]) as model_dir:
        rows = []
        for workers in args.workers:
            config = apply_overrides(
                load_serve_config(None),
                model_path=model_dir,
                workers=workers,
                device=args.device.split(":")[0],
                dtype=args.dtype,
                model_name=None if args.model else f"{args.bench_model} (random weights)",
                port=0,
                http_port=0,
                max_concurrent_streams=max(args.concurrency) + 8,
            )
            with Server(config) as server, FrontClients() as clients:
                rows += [(workers, *row) for row in _measure(server, args, clients)]
                model_name = server.model_name
        _print(rows, args, model_dir, model_name)
    return 0


def _measure(server, args, clients: FrontClients) -> list[tuple]:
    with InferenceClient(server.target) as client:
        vocab = client.model_info().vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(max(args.concurrency))
    ]
    params = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=args.new_tokens, ignore_eos=True)
    paths = {"engine via Ray (baseline)": lambda n: asyncio.run(_direct(server.cluster.router, prompts[:n], params))}
    names = {
        "moecluster": "moecluster.v1 (gRPC)",
        "kserve": "KServe v2 (tritonclient)",
        "openai": "OpenAI (openai SDK)",
    }
    for front in args.front:
        paths[names[front]] = functools.partial(_through, clients, front, server, prompts, args.new_tokens)
    for run in paths.values():  # warm-up: first calls pay for imports, connections (HTTP/1.1: one per concurrent
        run(max(args.concurrency))  # stream) and allocator growth
    rows = []
    for n in args.concurrency:
        samples = {name: ([], [], []) for name in paths}
        for _ in range(args.rounds):
            for name, run in paths.items():
                ttfts, itls, rate = run(n)
                samples[name][0].extend(ttfts)
                samples[name][1].extend(itls)
                samples[name][2].append(rate)
        rows += [(n, name, ttft, itl, statistics.mean(rates)) for name, (ttft, itl, rates) in samples.items()]
    return rows


def _through(clients: FrontClients, front: str, server, prompts, new_tokens: int, n: int):
    return clients.run(front, server, prompts[:n], new_tokens)


async def _direct(router, prompts, params):
    async def stream(ids):
        request = EngineRequest(uuid.uuid4().hex, params, prompt_ids=tuple(ids))
        async for ref in router.generate_stream.options(num_returns="streaming").remote(request):
            item = await ref
            if isinstance(item, Delta) and item.token_ids:
                yield len(item.token_ids)

    return await timed([stream(ids) for ids in prompts])


def _print(rows, args, model_dir: str, model_name: str) -> None:
    print(
        f"model {model_name} ({model_dir}) on {args.device}, prompt {args.prompt_len} tokens, {args.new_tokens} new "
        f"tokens, greedy, {args.rounds} rounds per row; times in ms"
    )
    header = ("workers", "streams", "path", "TTFT mean", "p50", "p99", "ITL mean", "p50", "p99", "tokens/s")
    table = [header] + [
        (str(w), str(n), name, *_ms(ttft), *_ms(itl), f"{rate:.0f}") for w, n, name, ttft, itl, rate in rows
    ]
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    for r in table:
        print("  ".join(cell.rjust(w) if c != 2 else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths))))


def _ms(values: list[float]) -> tuple[str, str, str]:
    if not values:
        return "-", "-", "-"
    s = sorted(values)

    def pick(q: float) -> float:
        return s[min(len(s) - 1, int(q * len(s)))]

    return f"{1000 * statistics.mean(s):.1f}", f"{1000 * pick(0.5):.1f}", f"{1000 * pick(0.99):.1f}"
