"""The sampler at batch speed and the cost of constraints.

Part 1, time per sampling step at 1, 64 and 256 rows: the per-row reference sampler (router/reference/sampler.py,
the engine's sampler before the batched one) against the batched one, the same logits and sequences, in the same
run; and the host reads each makes per step. Rows sample like Llama 4's defaults (temperature 0.6, top_p 0.9),
seeded, with logprobs on every fourth row, over a vocabulary of Llama 4's size, logits drawn peaked like a model's.

Part 2, tokens/s of 32 streams through the engine (in-process, the tiny model) with 0%, 50% and 100% of them
JSON-schema constrained; every stream generates the same number of tokens (a schema of a fixed-length array, the
free streams the same count with ignore_eos), so the rows differ only by the constraint.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from deploy.bench.host_reads import HostSyncs
from deploy.bench.models import bench_checkpoint
from router.engine import sampler
from router.engine.config import EngineConfig
from router.engine.engine import Engine
from router.engine.sequence import Sequence
from router.reference import sampler as reference
from router.request.constraint import Constraint
from router.request.messages import Delta, EngineRequest
from router.request.sampling_params import SamplingParams

LLAMA4_VOCAB = 202048
ITEMS = 24  # integers in the constrained streams' array: about 2 tokens each


def run_sampler_bench(args) -> int:
    if "step" in args.parts:
        _print_steps([_step_row(n, args) for n in args.rows], args)
    if "constraints" in args.parts:
        _print_constraints(_constraint_rows(args), args)
    return 0


def _batch(n: int, args) -> tuple[torch.Tensor, list[Sequence]]:
    g = torch.Generator().manual_seed(n)
    logits = (torch.randn(n, args.vocab, generator=g) * 4).to(args.device)  # peaked, as a model's are
    seqs = []
    for i in range(n):
        p = SamplingParams(temperature=0.6, top_p=0.9, seed=i, logprobs=i % 4 == 0, top_logprobs=5 if i % 4 == 0 else 0)
        seqs.append(Sequence(f"r{i}", (1, 2, 3), p.with_defaults({}).validate(), seed=i, output_ids=(4, 5)))
    return logits, seqs


def _time(fn, iters: int, device: str) -> tuple[float, int]:
    fn()  # warm-up
    times, reads = [], 0
    for _ in range(iters):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with HostSyncs() as r:
            fn()
        times.append(time.perf_counter() - t0)
        reads = r.calls
    return statistics.median(times), reads


def _step_row(n: int, args) -> dict:
    logits, seqs = _batch(n, args)
    old_iters = max(1, args.iters // 4) if n > 16 else args.iters
    old, old_reads = _time(lambda: reference.sample_batch(logits, seqs), old_iters, args.device)
    new, new_reads = _time(lambda: sampler.sample_batch(logits, seqs), args.iters, args.device)
    return {"rows": n, "old": old, "new": new, "old_reads": old_reads, "new_reads": new_reads}


def _print_steps(rows: list[dict], args) -> None:
    print(f"sampler step, {args.device}, vocab {args.vocab}, temperature 0.6 top_p 0.9 seeded, logprobs on 1 row in 4")
    print(f"{'rows':>5} {'per-row ms':>11} {'batched ms':>11} {'speedup':>8} {'host reads':>11}")
    for r in rows:
        reads, speedup = f"{r['old_reads']} -> {r['new_reads']}", r["old"] / r["new"]
        print(f"{r['rows']:>5} {r['old'] * 1e3:>11.2f} {r['new'] * 1e3:>11.2f} {speedup:>7.1f}x {reads:>11}")
    print("(the draws differ once, by design: counter-based Gumbel noise replaced the per-row generators)")


def _constraint_rows(args) -> list[dict]:
    schema = {"type": "array", "items": {"type": "integer", "minimum": 10, "maximum": 99}}
    schema |= {"minItems": ITEMS, "maxItems": ITEMS}
    constraint = Constraint("json_schema", json.dumps(schema))
    cfg = EngineConfig(max_num_seqs=args.streams, max_num_batched_tokens=4096, kv_cache_memory=256 << 20)
    rows = []
    with bench_checkpoint(args.model) as model_dir:
        engine = Engine.from_checkpoint(model_dir, args.device, config=cfg)
        tokens = _constrained_tokens(engine, constraint)
        for share in args.constrained:
            k = round(args.streams * share / 100)
            rates = [_streams_rate(engine, k, args.streams, constraint, tokens) for _ in range(args.rounds)]
            rows.append({"share": share, "constrained": k, "tok_s": statistics.median(rates), "tokens": tokens})
    return rows


def _constrained_tokens(engine: Engine, constraint: Constraint) -> int:
    """How many tokens a constrained stream generates (the array's tokens and the stop token)."""
    engine.add(EngineRequest("probe", SamplingParams(temperature=1.0, seed=0, constraint=constraint), prompt="["))
    n = 0
    while engine.has_work():
        n += sum(len(d.token_ids) for d in engine.step() if isinstance(d, Delta))
    return n


def _streams_rate(engine: Engine, k: int, n: int, constraint: Constraint, tokens: int) -> float:
    for i in range(n):
        c = constraint if i < k else None
        p = SamplingParams(temperature=1.0, seed=i, max_tokens=tokens, ignore_eos=c is None, constraint=c)
        engine.add(EngineRequest(f"s{i}", p, prompt=f"Numbers {i}:"))
    while engine.constrained.pending:  # the compile is cached after the first round; timed from here
        engine.step()
    t0, total = time.perf_counter(), 0
    while engine.has_work():
        total += sum(len(d.token_ids) for d in engine.step() if isinstance(d, Delta))
    return total / (time.perf_counter() - t0)


def _print_constraints(rows: list[dict], args) -> None:
    print(f"\nconstraint cost: {args.streams} streams, tiny model, {args.device}, ~{rows[0]['tokens']} tokens each")
    print(f"{'constrained':>12} {'tok/s':>9} {'vs 0%':>7}")
    base = rows[0]["tok_s"]
    for r in rows:
        print(f"{r['share']:>10}% {r['tok_s']:>9.1f} {r['tok_s'] / base:>6.2f}x")
