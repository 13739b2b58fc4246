"""Rebalancing on a skewed load: a model whose gates send every token to experts 0 and 1 of each layer, served
by N workers; the max/mean load per worker (tokens each served, from the workers' own counts) and tokens/s before
a rebalance (the baseline, same run) and after it, with the time the rebalance took while requests ran."""

from __future__ import annotations

import statistics
import threading
import time
import uuid

from deploy.bench.models import BENCH_MODELS, bench_checkpoint, skew_gates
from deploy.cluster_config import ClusterConfig
from deploy.deployment import Deployment, DeploymentSpec
from router.request.messages import EngineRequest
from router.request.sampling_params import SamplingParams


def run_rebalance_bench(args) -> int:
    rows = []
    for name in args.models:
        with bench_checkpoint(None, overrides=BENCH_MODELS[name]) as model_dir:
            skew_gates(model_dir, hot=(0, 1))
            rows.append((name, _measure(model_dir, args)))
    _print(rows, args)
    return 0


def _measure(model_dir: str, args) -> dict:
    cluster = ClusterConfig(workers=args.workers, redundant_experts_per_worker=args.redundant)
    with Deployment.start(DeploymentSpec(model_dir, cluster, show_progress=False)) as d:
        requests = lambda: [  # noqa: E731
            EngineRequest(
                uuid.uuid4().hex,
                SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True),
                prompt_ids=(1, 5 + i, 9, 40 + i),
            )
            for i in range(args.streams)
        ]
        d.generate_batch(requests())  # warm-up
        before = _window(d, requests)
        plans, took = [], []

        def rebalance():
            start = time.perf_counter()
            plans.append(d.rebalance())
            took.append(time.perf_counter() - start)

        rebalancer = threading.Thread(target=rebalance)
        rebalancer.start()
        during = d.generate_batch(requests(), timeout_s=600)
        rebalancer.join()
        after = _window(d, requests)
        return {
            "before": before,
            "after": after,
            "plan": plans[0],
            "took": took[0],
            "failed": sum(r["finish_reason"] == "error" for r in during),
        }


def _window(deployment, requests) -> dict:
    mark = _loads(deployment)
    start = time.perf_counter()
    results = deployment.generate_batch(requests(), timeout_s=600)
    wall = time.perf_counter() - start
    loads = [b - a for a, b in zip(mark, _loads(deployment))]
    return {
        "imbalance": max(loads) / statistics.mean(loads) if sum(loads) else 1.0,
        "tokens_per_s": sum(len(r["token_ids"]) for r in results) / wall,
        "loads": loads,
    }


def _loads(deployment) -> list[int]:
    """Tokens each worker's copies have served so far."""
    return [sum(sum(c.values()) for c in s.tokens_per_expert.values()) for s in deployment.stats().workers]


def _print(rows, args) -> None:
    print(
        f"rebalance: gates send every token to experts 0 and 1; {args.workers} workers with "
        f"{args.redundant} redundant expert slots each; {args.streams} streams of {args.tokens} greedy tokens"
    )
    header = (
        "model",
        "max/mean per worker before",
        "after",
        "tok/s before (baseline)",
        "tok/s after",
        "rebalance took s",
        "copies loaded",
        "failed during",
    )
    table = [header]
    for name, m in rows:
        plan = m["plan"]
        table.append(
            (
                name,
                f"{m['before']['imbalance']:.2f}",
                f"{m['after']['imbalance']:.2f}",
                f"{m['before']['tokens_per_s']:.0f}",
                f"{m['after']['tokens_per_s']:.0f}",
                f"{m['took']:.2f}",
                str(plan.moved if plan else 0),
                str(m["failed"]),
            )
        )
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    for r in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))
    for name, m in rows:
        print(f"{name}: tokens per worker before {m['before']['loads']}, after {m['after']['loads']}")
