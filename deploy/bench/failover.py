"""What a worker's death costs: for each model and replica count, streams run continuously while expert workers
are killed (SIGKILL) one at a time; printed per row: the failover stall as the router measured it (p50, p99), the
longest gap a client saw between two tokens, and tokens/s before, during and after the failovers, beside the same
streams undisturbed in the same run (the baseline).

Each kill lands while every stream generates (deploy/bench/interruption.py): once each stream's current request has
a token and tokens left; the requests restart as they finish, so the load runs on until every kill has been
recovered from. Afterwards every kill is checked against the token arrival times (each stream got tokens before it
and after it, before the next kill); a row with a kill that did not interrupt every stream says so instead of the
stall figures."""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
import uuid

import ray

from cluster.actor_state import MemberState
from deploy.bench.interruption import AFTER_LOAD, StreamLog, interrupted, kill_when_ready, ready_to_kill
from deploy.bench.models import BENCH_MODELS, bench_checkpoint
from deploy.cluster_config import ClusterConfig
from deploy.deployment import Deployment, DeploymentSpec
from router.request.messages import Delta, EngineRequest
from router.request.sampling_params import SamplingParams


def run_failover_bench(args) -> int:
    rows = []
    for name in args.models:
        with bench_checkpoint(None, overrides=BENCH_MODELS[name]) as model_dir:
            for replicas in args.replicas:
                rows.append((name, replicas, _measure(model_dir, replicas, args)))
    _print(rows, args)
    return 0


def _measure(model_dir: str, replicas: int, args) -> dict:
    spec = DeploymentSpec(model_dir, ClusterConfig(workers=args.workers, expert_replicas=replicas), show_progress=False)
    with Deployment.start(spec) as d:
        load = _Load(d, args.streams, args.tokens)
        load.start()
        time.sleep(args.settle_s)
        before = load.rate(args.window_s)
        gaps, during, kills = [], [], []
        for k in range(args.kills):
            victim = d.workers[k % args.workers]
            pid = ray.get(victim.ping.remote(), timeout=30).pid
            marks = []
            kill = lambda: (marks.append(load.tokens), os.kill(pid, signal.SIGKILL))  # noqa: E731
            kills.append(kill_when_ready(lambda: ready_to_kill(load.current), lambda: False, kill))
            _wait_serving(d)
            during.append((load.tokens - marks[0]) / (time.perf_counter() - kills[-1]))
            gaps.append(load.longest_gap_since(kills[-1]))
            time.sleep(args.settle_s)
        after = load.rate(args.window_s)
        channel = d.stats().router.channel
        stalls = list(channel.stalls_s[-args.kills :])
        load.stop()
        ends = [*kills[1:], time.perf_counter()]
        return {
            "stalls": stalls,
            "gaps": gaps,
            "before": before,
            "during": statistics.mean(during),
            "after": after,
            "errors": load.errors,
            "missed": sum(not interrupted(load.times, at, until) for at, until in zip(kills, ends)),
        }


def _wait_serving(deployment, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    time.sleep(0.5)  # the supervisor notices the death first
    while any(s.state is not MemberState.SERVING for s in deployment.supervision().slots):
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster did not return to full strength")
        time.sleep(0.05)


class _Load:
    """`streams` requests at a time, each replaced by a new one when it finishes; token arrival times kept."""

    def __init__(self, deployment, streams: int, tokens: int):
        self.router, self.streams, self.tokens_per_request = deployment.router, streams, tokens
        self.tokens, self.errors = 0, 0
        self.current = [StreamLog(tokens) for _ in range(streams)]  # each stream's request in progress
        self.times: list[list[float]] = [[] for _ in range(streams)]  # each stream's token arrivals, all requests
        self._gaps: list[tuple[float, float]] = []  # (time, gap) per token
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(streams)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def rate(self, window_s: float) -> float:
        mark, start = self.tokens, time.perf_counter()
        time.sleep(window_s)
        return (self.tokens - mark) / (time.perf_counter() - start)

    def longest_gap_since(self, since: float) -> float:
        return max((gap for t, gap in self._gaps if t >= since), default=0.0)

    def _run(self, i: int) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=self.tokens_per_request, ignore_eos=True)
        while not self._stop.is_set():
            request = EngineRequest(uuid.uuid4().hex, params, prompt_ids=(1, 5 + i, 9, 40 + i))
            log = self.current[i] = StreamLog(self.tokens_per_request)
            for ref in self.router.generate_stream.options(num_returns="streaming").remote(request):
                item = ray.get(ref)
                now = time.perf_counter()
                if isinstance(item, Delta) and item.token_ids:
                    self.tokens += len(item.token_ids)
                    if log.times:
                        self._gaps.append((now, now - log.times[-1]))
                    log.add(len(item.token_ids), now)
                    self.times[i].append(now)
                elif not isinstance(item, Delta) and item.finish_reason == "error":
                    self.errors += 1
            log.done = True


def _print(rows, args) -> None:
    print(
        f"failover: {args.workers} workers on cpu, {args.streams} streams of {args.tokens} greedy tokens running "
        f"continuously, {args.kills} worker kills (SIGKILL) per row, one at a time, {args.window_s:g}s windows"
    )
    header = (
        "model",
        "replicas",
        "stall p50 s",
        "stall p99 s",
        "longest token gap s",
        "tok/s before (baseline)",
        "tok/s during",
        "tok/s after",
        "failed requests",
    )
    table = [header]
    for name, replicas, m in rows:
        stalls = sorted(m["stalls"])
        figures = (f"{_quantile(stalls, 0.5):.3f}", f"{_quantile(stalls, 0.99):.3f}", f"{max(m['gaps']):.3f}")
        if m["missed"]:
            figures = ("-", "-", f"{AFTER_LOAD} ({m['missed']} of {args.kills} kills)")
        table.append(
            (
                name,
                str(replicas),
                *figures,
                f"{m['before']:.0f}",
                f"{m['during']:.0f}",
                f"{m['after']:.0f}",
                str(m["errors"]),
            )
        )
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    for r in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))
    print(
        "stall: from the failed step to the replayed one, as the router timed it (fence, settle, hold, regroup); "
        "during: tokens/s from each kill until every worker serves again"
    )


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")
