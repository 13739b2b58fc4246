"""Prefix caching: a multi-turn chat through the gRPC gateway. `--users` users share a system prompt of
`--system-len` tokens; each takes `--turns` turns, each turn's prompt the whole history so far (the system prompt,
then every user message of `--user-len` tokens and every answer of `--new-tokens` greedy tokens). The users run at
once, each turn sent when the user's previous answer is complete.

Deployments, one after another, in the same run (the same checkpoint and workers):
  - 1 router, prefix caching off (the baseline) and on: TTFT p50/p99 per turn, output tokens/s, the hit rate
    (cached_tokens / prompt_tokens of the Completes), and whether every answer is the baseline's;
  - the same two on a workload with no sharing (one turn of distinct prompts): the bookkeeping's cost in tokens/s;
  - 2 routers (with --routers2), caching on, least-loaded routing against cache-aware routing: the same figures.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from deploy import private_ray
from deploy.bench.models import BENCH_MODELS, bench_checkpoint
from deploy.cluster_config import ClusterConfig
from deploy.config import parse_serve_config
from deploy.ray_runtime import bundles
from deploy.server import Server
from protos.async_client import AsyncInferenceClient

log = logging.getLogger(__name__)


@dataclass
class Run:
    name: str
    ttft_s: dict[int, list[float]] = field(default_factory=dict)  # turn index (1-based) -> TTFTs
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    wall_s: float = 0.0
    answers: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # (user, turn) -> tokens
    routers: list[int] = field(default_factory=list)  # requests finished per router

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0


def run_prefix_bench(args) -> int:
    longest = args.system_len + args.turns * (args.user_len + args.new_tokens)
    rows, unshared = [], []
    with bench_checkpoint(None, overrides=BENCH_MODELS[args.bench_model]) as model_dir, _one_ray(args):
        deployments = [
            ("1 router, cache off", 1, False, "least_loaded"),
            ("1 router, cache on", 1, True, "cache_aware"),
        ]
        if args.routers2:
            deployments += [
                ("2 routers, cache on, least-loaded", 2, True, "least_loaded"),
                ("2 routers, cache on, cache-aware", 2, True, "cache_aware"),
            ]
        for name, routers, caching, routing in deployments:
            with _serve(model_dir, routers, caching, routing, args) as server:
                vocab, context = asyncio.run(_model(server.target))
                if longest > context:
                    raise SystemExit(
                        f"the longest conversation is {longest} tokens but the model's context is {context}; "
                        "lower --system-len, --user-len, --new-tokens or --turns"
                    )
                rows.append(asyncio.run(_chat(server.target, name, vocab, args)))
                if routers == 1:
                    unshared.append(asyncio.run(_unshared(server.target, name, vocab, args)))
    _print(rows, unshared, args)
    return 0


@contextmanager
def _one_ray(args):
    """One private Ray for every deployment of the run (each joins it): started once, and again if its raylet was too
    slow to register (a busy machine), at most three times."""
    cpus = sum(b["CPU"] for b in bundles(ClusterConfig(routers=2, workers=args.workers))) + 1
    for attempt in range(3):
        try:
            private_ray.start(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus)))
            break
        except Exception as e:  # Ray raises a bare Exception when its node starts too slowly
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            log.warning("Ray started too slowly (%s); trying again", e)
    try:
        yield
    finally:
        private_ray.shutdown()


def _serve(model_dir: str, routers: int, caching: bool, routing: str, args) -> Server:
    config = parse_serve_config(
        {
            "model": {"path": model_dir},
            "cluster": {"routers": routers, "workers": args.workers},
            "scheduler": {"prefix_caching": caching},
            "gateway": {"port": 0, "max_concurrent_streams": 4 * args.users, "routing": routing},
        }
    )
    return Server(config, show_progress=False)  # started by `with`


async def _model(target: str) -> tuple[int, int]:
    async with AsyncInferenceClient(target) as client:
        info = await client.model_info()
        return info.vocab_size, info.context_length


def _tokens(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


async def _chat(target: str, name: str, vocab: int, args) -> Run:
    rng = random.Random(args.seed)
    system = _tokens(rng, vocab, args.system_len)
    messages = {(u, t): _tokens(rng, vocab, args.user_len) for u in range(args.users) for t in range(args.turns)}
    run = Run(name)
    async with AsyncInferenceClient(target) as client:
        start = time.perf_counter()
        await asyncio.gather(*(_user(client, u, system, messages, run, args) for u in range(args.users)))
        run.wall_s = time.perf_counter() - start
        run.routers = [sum(r.finished.values()) for r in (await client.cluster_status()).routers]
    return run


async def _user(client, user: int, system: list[int], messages, run: Run, args) -> None:
    history = list(system)
    for turn in range(args.turns):
        history += messages[user, turn]
        answer = await _turn(client, history, turn + 1, run, args)
        run.answers[user, turn + 1] = answer
        history += answer


async def _turn(client, prompt: list[int], turn: int, run: Run, args) -> list[int]:
    sent = time.perf_counter()
    first = None
    generation = client.generate(input_ids=prompt, max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    async for chunk in generation:
        if first is None and chunk.token_ids:
            first = time.perf_counter()
    result = generation.result
    run.ttft_s.setdefault(turn, []).append(first - sent)
    run.output_tokens += result.completion_tokens
    run.prompt_tokens += result.prompt_tokens
    run.cached_tokens += result.cached_tokens
    return list(result.token_ids)


async def _unshared(target: str, name: str, vocab: int, args) -> Run:
    """One turn per user of a prompt shared with nobody: what the cache's bookkeeping costs."""
    rng = random.Random(args.seed + 1)
    prompts = [_tokens(rng, vocab, args.user_len) for _ in range(args.users)]
    run = Run(name)
    async with AsyncInferenceClient(target) as client:
        start = time.perf_counter()
        answers = await asyncio.gather(*(_turn(client, p, 1, run, _Sized(args, args.unshared_tokens)) for p in prompts))
        run.wall_s = time.perf_counter() - start
    run.answers = {(u, 1): a for u, a in enumerate(answers)}
    return run


class _Sized:
    """The bench's arguments with another answer length."""

    def __init__(self, args, new_tokens: int):
        self.__dict__.update(vars(args))
        self.new_tokens = new_tokens


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def _print(rows: list[Run], unshared: list[Run], args) -> None:
    base = rows[0]
    print(
        f"prefix: model {args.bench_model}, {args.workers} expert workers on cpu ({os.cpu_count()} cores), "
        f"{args.users} users x {args.turns} turns, system prompt {args.system_len} tokens, user messages "
        f"{args.user_len}, answers {args.new_tokens} greedy tokens, through the gRPC gateway"
    )
    turns = range(1, args.turns + 1)
    header = (
        "deployment",
        *(f"turn {t} TTFT p50/p99 s" for t in turns),
        "turns 2+ p50 vs off",
        "out tok/s",
        "hit rate",
        "per router",
        "same tokens",
    )
    table = [header]
    later = lambda r: statistics.median([x for t in turns if t > 1 for x in r.ttft_s[t]] or [0.0])  # noqa: E731
    for r in rows:
        table.append(
            (
                r.name,
                *(f"{_pct(r.ttft_s[t], 0.5):.2f}/{_pct(r.ttft_s[t], 0.99):.2f}" for t in turns),
                f"{later(r) / later(base):.2f}x" if later(base) else "-",
                f"{r.tokens_per_s:.1f}",
                f"{100 * r.hit_rate:.1f}%",
                "/".join(map(str, r.routers)),
                "yes" if r.answers == base.answers else "NO",
            )
        )
    _table(table)
    if len(unshared) == 2:
        off, on = unshared
        print(
            f"no sharing ({args.users} distinct {args.user_len}-token prompts, {args.unshared_tokens} tokens each): "
            f"cache off {off.tokens_per_s:.1f} tok/s, cache on {on.tokens_per_s:.1f} tok/s "
            f"({on.tokens_per_s / off.tokens_per_s:.2f}x), hit rate {100 * on.hit_rate:.1f}%, same tokens "
            f"{'yes' if on.answers == off.answers else 'NO'}"
        )
    aware = [r for r in rows if r.name.endswith("cache-aware")]
    if aware and len(rows) > 1 and rows[1].hit_rate:
        print(f"cache-aware hit rate with 2 routers / 1 router: {aware[0].hit_rate / rows[1].hit_rate:.2f}")


def _table(rows: list[tuple]) -> None:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))))
