"""Serving throughput and latency: 1, 8 and 32 concurrent requests through the engine (in-process, and with Ray
expert workers), beside transformers' `generate` run one request at a time, same checkpoint, same run.

With workers, each row also says how the router spent its forward passes: the share blocked in combine waiting
for the workers (the rest is the router computing: attention, gate, shared expert, the exchange's own work), so
the overlap that micro-batches buy is measured, not assumed."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable

import ray
import torch

from cluster.config import load_model_config
from deploy.bench.exchange_timer import ExchangeBenchRouter
from deploy.bench.models import BENCH_MODELS, bench_checkpoint, load_transformers
from deploy.cluster_config import ClusterConfig
from deploy.deployment import Deployment, DeploymentSpec
from router.engine.async_engine import AsyncEngine
from router.engine.config import EngineConfig
from router.engine.engine import Engine
from router.request.messages import Delta, EngineRequest, Final
from router.request.sampling_params import SamplingParams


def run_engine_bench(args) -> int:
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    with bench_checkpoint(args.model, BENCH_MODELS[args.bench_model]) as model_dir:
        prompts = _prompts(model_dir, args)
        rows = []
        for expert_dtype in args.expert_dtype:
            rows += _in_process(model_dir, prompts, params, args, expert_dtype)
            for workers in (w for w in args.workers if w):  # 0: in-process only
                for micro_batches in args.micro_batches:
                    rows += _with_workers(model_dir, prompts, params, args, workers, micro_batches, expert_dtype)
        rows += _transformers(model_dir, prompts, params, args)
    _print(rows, args)
    return 0


def _prompts(model_dir: str, args) -> list[list[int]]:
    vocab = load_model_config(model_dir).vocab_size
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(max(args.concurrency))]


async def _measure(stream_for: Callable[[EngineRequest], AsyncIterator], prompts, params) -> dict:
    """Run all prompts at once; tokens/s over the wall time, inter-token latency within each request."""
    gaps: list[float] = []
    tokens = 0

    async def one(ids):
        nonlocal tokens
        last = None
        async for item in stream_for(EngineRequest(uuid.uuid4().hex, params, prompt_ids=tuple(ids))):
            now = time.perf_counter()
            if isinstance(item, Delta):
                tokens += len(item.token_ids)
                if last is not None:
                    gaps.append(now - last)
                last = now
            elif isinstance(item, Final) and item.finish_reason == "error":
                raise RuntimeError(item.error)

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "itl_ms": 1e3 * statistics.mean(gaps) if gaps else float("nan")}


def _warm_then_measure(stream_for, prompts, params, stats: Callable[[], dict] | None = None) -> dict:
    """One unmeasured round at this concurrency first: on CUDA, new batch shapes pick their kernels then. With
    `stats` (the router's exchange_stats), the measured round's share of forward time blocked in combine."""
    asyncio.run(_measure(stream_for, prompts, params))
    before = stats() if stats else None
    result = asyncio.run(_measure(stream_for, prompts, params))
    if stats:
        after = stats()
        forward = after["forward_s"] - before["forward_s"]
        result["blocked"] = (after["waited_s"] - before["waited_s"]) / forward if forward else float("nan")
        result["step_ms"] = 1e3 * forward / max(1, after["steps"] - before["steps"])
    return result


def _in_process(model_dir, prompts, params, args, expert_dtype: str = "auto") -> list[tuple]:
    config = EngineConfig(max_num_seqs=max(args.concurrency))
    engine = Engine.from_checkpoint(model_dir, args.device, args.dtype, config, expert_dtype=expert_dtype)
    held = engine.runner.experts.shards[load_model_config(model_dir).moe_layers[0]].weight_dtype
    engine = AsyncEngine(engine)
    try:
        return [
            (f"engine, in-process experts {held}", n, _warm_then_measure(engine.generate, prompts[:n], params))
            for n in args.concurrency
        ]
    finally:
        engine.shutdown()


def _with_workers(
    model_dir, prompts, params, args, workers: int, micro_batches: int | None, expert_dtype: str = "auto"
) -> list[tuple]:
    spec = DeploymentSpec(
        model_dir,
        ClusterConfig(device="cuda" if args.device.startswith("cuda") else "cpu", workers=workers),
        EngineConfig(max_num_seqs=max(args.concurrency), micro_batches=micro_batches),
        dtype=args.dtype,
        show_progress=False,
        router_class=ExchangeBenchRouter,
        expert_dtype=expert_dtype,
    )
    name = f"engine, {workers} Ray worker{'s' if workers > 1 else ''}, mb {micro_batches or 'auto'}"
    name += f", experts {expert_dtype}" if expert_dtype != "auto" else ""
    with Deployment.start(spec) as deployment:

        async def stream(request):
            async for ref in deployment.router.generate_stream.options(num_returns="streaming").remote(request):
                yield await ref

        def stats() -> dict:
            return ray.get(deployment.router.exchange_stats.remote(), timeout=60)

        return [(name, n, _warm_then_measure(stream, prompts[:n], params, stats)) for n in args.concurrency]


def _transformers(model_dir, prompts, params, args) -> list[tuple]:
    hf = load_transformers(model_dir, args.device, args.dtype)
    if hf is None:
        return []
    rows = []
    with torch.inference_mode():  # warm-up
        x = torch.tensor([prompts[0]], device=args.device)
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=2, do_sample=False)
    for n in args.concurrency:
        start = time.perf_counter()
        with torch.inference_mode():
            for ids in prompts[:n]:  # one request at a time: generate has no continuous batching
                x = torch.tensor([ids], device=args.device)
                hf.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=params.max_tokens,
                    min_new_tokens=params.max_tokens,
                    do_sample=False,
                )
        wall = time.perf_counter() - start
        rows.append(
            (
                "transformers generate, sequential",
                n,
                {"tokens_per_s": n * params.max_tokens / wall, "itl_ms": 1e3 * wall / (n * params.max_tokens)},
            )
        )
    return rows


def _print(rows, args) -> None:
    print(
        f"serving: prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per request (greedy), "
        f"{args.device} {args.dtype}, {torch.get_num_threads()} CPU threads in this process, model "
        f"{args.model or args.bench_model}"
    )
    print(f"{'path':<48} {'concurrent':>10} {'tokens/s':>10} {'mean ITL ms':>12} {'step ms':>8} {'blocked':>8}")
    for name, n, m in rows:
        extra = f" {m['step_ms']:>8.2f} {m['blocked']:>8.0%}" if "blocked" in m else ""
        print(f"{name:<48} {n:>10} {m['tokens_per_s']:>10.1f} {m['itl_ms']:>12.2f}{extra}")
    print("step ms: the router's mean forward pass; blocked: its share spent in combine waiting for the workers")
