"""Latency through the gateway's fronts beside the engine called directly (router.generate_stream over Ray from
this process, no gateway), same server, same run, rounds interleaved: time to first token and inter-token
latency for 1 and N concurrent streams. The difference is what the gateway costs (admission, validation,
protobuf, HTTP/2, one more event loop). `--front` picks the fronts, each driven by its own client library:
moecluster (protos.async_client), kserve (tritonclient.grpc.aio, ModelStreamInfer) and openai (the openai SDK's
AsyncOpenAI, streamed completions). Several `--workers` counts run one server each, in the same run, so the
expert workers' cost reads off the same table (0: every expert in the router)."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
import uuid

import torch

from deploy.bench.models import BENCH_MODELS, bench_checkpoint
from deploy.config import apply_overrides, load_serve_config
from deploy.server import Server
from protos.async_client import AsyncInferenceClient
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
            with Server(config) as server:
                rows += [(workers, *row) for row in _measure(server, args)]
                model_name = server.model_name
        _print(rows, args, model_dir, model_name)
    return 0


def _measure(server, args) -> list[tuple]:
    vocab = asyncio.run(_vocab(server.target))
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(max(args.concurrency))
    ]
    params = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=args.new_tokens, ignore_eos=True)
    paths = {"engine via Ray (baseline)": lambda n: _direct(server.cluster.router, prompts[:n], params)}
    clients = {
        "moecluster": ("moecluster.v1 (gRPC)", lambda n: _grpc(server.target, prompts[:n], params)),
        "kserve": ("KServe v2 (tritonclient)", lambda n: _kserve(server.target, prompts[:n], params)),
        "openai": ("OpenAI (openai SDK)", lambda n: _openai(server, prompts[:n], params)),
    }
    paths.update(clients[front] for front in args.front)
    for run in paths.values():  # warm-up: first calls pay for imports, connections and allocator growth
        asyncio.run(run(1))
    rows = []
    for n in args.concurrency:
        samples = {name: ([], [], []) for name in paths}
        for _ in range(args.rounds):
            for name, run in paths.items():
                ttfts, itls, rate = asyncio.run(run(n))
                samples[name][0].extend(ttfts)
                samples[name][1].extend(itls)
                samples[name][2].append(rate)
        rows += [(n, name, ttft, itl, statistics.mean(rates)) for name, (ttft, itl, rates) in samples.items()]
    return rows


async def _vocab(target: str) -> int:
    async with AsyncInferenceClient(target) as client:
        return (await client.model_info()).vocab_size


async def _timed(streams) -> tuple[list[float], list[float], float]:
    """Run the (start time, async iterator of token counts) streams together: TTFTs, ITLs, tokens/s."""
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_one(s) for s in streams))
    wall = time.perf_counter() - t0
    ttfts = [r[0] for r in results]
    itls = [gap for r in results for gap in r[1]]
    return ttfts, itls, sum(r[2] for r in results) / wall


async def _one(stream) -> tuple[float, list[float], int]:
    start = time.perf_counter()
    times, tokens = [], 0
    async for n in stream:
        times.append(time.perf_counter())
        tokens += n
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return times[0] - start, gaps, tokens


async def _direct(router, prompts, params):
    async def stream(ids):
        request = EngineRequest(uuid.uuid4().hex, params, prompt_ids=tuple(ids))
        async for ref in router.generate_stream.options(num_returns="streaming").remote(request):
            item = await ref
            if isinstance(item, Delta) and item.token_ids:
                yield len(item.token_ids)

    return await _timed([stream(ids) for ids in prompts])


async def _grpc(target, prompts, params):
    async with AsyncInferenceClient(target) as client:

        async def stream(ids):
            gen = client.generate(
                input_ids=ids,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                max_tokens=params.max_tokens,
                ignore_eos=True,
            )
            async for chunk in gen:
                if chunk.token_ids:
                    yield len(chunk.token_ids)

        return await _timed([stream(ids) for ids in prompts])


async def _kserve(target, prompts, params):
    import numpy as np
    import tritonclient.grpc.aio as triton

    client = triton.InferenceServerClient(target)
    sampling = dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, ignore_eos=True)

    async def stream(ids):
        tensor = triton.InferInput("input_ids", [len(ids)], "INT64")
        tensor.set_data_from_numpy(np.array(ids, dtype=np.int64))

        async def one_request():
            yield {"model_name": "", "inputs": [tensor], "parameters": {"max_tokens": params.max_tokens, **sampling}}

        async for result, error in client.stream_infer(one_request()):
            if error is not None:
                raise error
            out = result.as_numpy("output_ids")
            if out is not None and len(out):
                yield len(out)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break

    try:
        return await _timed([stream(ids) for ids in prompts])
    finally:
        await client.close()


async def _openai(server, prompts, params):
    """Streamed completions; each chunk is one engine Delta (one token while decoding)."""
    import openai

    base = f"http://127.0.0.1:{server.gateway.http_port}/v1"
    async with openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0) as client:

        async def stream(ids):
            chunks = await client.completions.create(
                model=server.model_name,
                prompt=ids,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                stream=True,
                extra_body={"top_k": params.top_k, "ignore_eos": True},
            )
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].finish_reason is None:
                    yield 1

        return await _timed([stream(ids) for ids in prompts])


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
