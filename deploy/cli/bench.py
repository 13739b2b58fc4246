"""`moecluster bench <what>`: benchmarks that print a table, each beside a baseline run in the same process."""

from __future__ import annotations

import argparse
import importlib

from deploy.bench.presets import BENCH_MODELS
from deploy.cli.arg_types import positive_ints

FRONTS = ("moecluster", "kserve", "openai")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark and print a table")
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    d = what.add_parser("decode", help="single-process greedy decode tokens/s vs transformers' generate")
    d.add_argument("--model", default=None, help="checkpoint directory (default: a fresh tiny scout model)")
    d.add_argument("--prompt-len", type=int, default=32)
    d.add_argument("--new-tokens", type=int, default=64)
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--dtype", default="float32", help="float32 (exact comparison) or bfloat16")
    d.set_defaults(run=_lazy("deploy.bench.decode", "run_decode_bench"))

    t = what.add_parser("transport", help="per MoE layer: all-to-all dispatch + combine vs in-process experts")
    t.add_argument(
        "--model", default=None, help="checkpoint directory (default: a generated 512-wide, 16-expert model)"
    )
    t.add_argument("--tokens", type=positive_ints, default=[1, 16, 256])
    t.add_argument("--workers", type=positive_ints, default=[1, 2, 4])
    t.add_argument("--iters", type=int, default=10)
    _device(t)
    t.set_defaults(run=_lazy("deploy.bench.transport", "run_transport_bench"))

    x = what.add_parser("exchange", help="per MoE layer: fixed-capacity vs split exchange (1, 2 workers) vs in-process")
    x.add_argument("--model", default=None, help="checkpoint directory (default: a generated --bench-model)")
    _bench_model(x, "moe-256")
    x.add_argument("--tokens", type=positive_ints, default=[1, 8, 32, 128, 512])
    x.add_argument("--workers", type=positive_ints, default=[1, 2])
    x.add_argument("--iters", type=int, default=20)
    _device(x)
    x.set_defaults(run=_lazy("deploy.bench.exchange", "run_exchange_bench"))

    g = what.add_parser(
        "grpc", help="time to first token and inter-token latency: through the gateway's fronts vs the engine via Ray"
    )
    g.add_argument("--model", default=None, help="checkpoint directory (default: a generated --bench-model)")
    _bench_model(g, "tiny")
    g.add_argument("--workers", type=_counts, default=[2], help="expert workers, one server each, e.g. 0,1,2")
    g.add_argument("--concurrency", type=positive_ints, default=[1, 16])
    g.add_argument("--prompt-len", type=int, default=32)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--rounds", type=int, default=3, help="rounds per path and concurrency (interleaved)")
    g.add_argument(
        "--front",
        type=_fronts,
        default=["moecluster"],
        help="the fronts to drive, each with its own client library: moecluster, kserve (tritonclient), openai (the "
        "openai SDK), e.g. moecluster,kserve,openai (kserve and openai need the test extras)",
    )
    _device(g)
    g.set_defaults(run=_lazy("deploy.bench.grpc", "run_grpc_bench"))

    e = what.add_parser("engine", help="continuous batching: 1/8/32 concurrent requests vs transformers, sequential")
    e.add_argument("--model", default=None, help="checkpoint directory (default: a generated --bench-model)")
    _bench_model(e, "tiny")
    e.add_argument("--concurrency", type=positive_ints, default=[1, 8, 32])
    e.add_argument("--prompt-len", type=int, default=16)
    e.add_argument("--new-tokens", type=int, default=32)
    e.add_argument("--workers", type=_counts, default=[2], help="also with these many Ray workers, e.g. 1,2 (0: skip)")
    e.add_argument(
        "--micro-batches",
        type=_micro_batches,
        default=[None],
        help="scheduler.micro_batches for the worker rows, e.g. auto,1,2 (one deployment each)",
    )
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", default="float32")
    e.add_argument(
        "--expert-dtype",
        type=_expert_dtypes,
        default=["auto"],
        help="routed experts held as: auto (as stored), fp8 (quantized on load), model (--dtype); a list like "
        "model,fp8 runs each, side by side",
    )
    e.set_defaults(run=_lazy("deploy.bench.engine", "run_engine_bench"))

    m = what.add_parser("moe-layer", help="one MoE layer's experts: loop vs grouped_mm vs transformers (dense)")
    _device(m)
    m.add_argument("--hidden", type=int, default=None, help="default: 5120 on CUDA (Scout), 1024 on CPU")
    m.add_argument("--width", type=int, default=None, help="expert width; default: 8192 on CUDA, 2048 on CPU")
    m.add_argument("--experts", type=int, default=16)
    m.add_argument("--top-k", type=int, default=1)
    m.add_argument("--tokens", type=positive_ints, default=[1, 8, 64, 256, 1024])
    m.add_argument("--iters", type=int, default=10)
    m.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip transformers' dense experts")
    m.set_defaults(run=_run_moe_layer)

    c = what.add_parser("collective", help="all_to_all_single cost at world size 1 (NCCL on CUDA, gloo on CPU)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--hidden", type=int, default=5120)
    c.add_argument("--tokens", type=positive_ints, default=[1, 16, 256])
    c.add_argument("--iters", type=int, default=20)
    c.set_defaults(run=_lazy("deploy.bench.moe_layer", "run_collective_bench"))

    v = what.add_parser(
        "vision",
        help="the Scout vision tower's encode time for 1 and 16 tiles; ITL of text streams while images arrive",
    )
    v.add_argument("--parts", type=_choices(("encode", "itl")), default=["encode", "itl"], help="encode,itl")
    v.add_argument("--tiles", type=positive_ints, default=[1, 16], help="encode: tiles per image to time")
    v.add_argument("--iters", type=int, default=1, help="encode: timed runs per row (median), after one warm-up")
    v.add_argument("--device", default="cpu", help="encode: the device")
    v.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="encode: the dtype")
    v.add_argument("--vision-encoders", type=_non_negative_ints, default=[1, 0], help="itl: each value in turn")
    v.add_argument("--streams", type=int, default=8, help="itl: concurrent text streams")
    v.add_argument("--tokens", type=int, default=300, help="itl: tokens per text stream")
    v.add_argument("--workers", type=int, default=2, help="itl: expert workers")
    v.add_argument("--tower-layers", type=int, default=4, help="itl: encoder layers of the Scout-width tower")
    v.add_argument("--rounds", type=int, default=3, help="itl: runs with and without images, interleaved")
    v.set_defaults(run=_run_vision)

    s = what.add_parser("sampler", help="sampler time per step, per-row vs batched; tok/s with 0/50/100%% constrained")
    s.add_argument("--parts", type=_choices(("step", "constraints")), default=["step", "constraints"])
    s.add_argument("--rows", type=positive_ints, default=[1, 64, 256], help="step: batch sizes")
    s.add_argument("--vocab", type=int, default=202048, help="step: vocabulary size (Llama 4's by default)")
    s.add_argument("--iters", type=int, default=8, help="step: timed steps per row (median; the per-row one fewer)")
    s.add_argument("--model", default=None, help="constraints: checkpoint directory (default: a fresh tiny model)")
    s.add_argument("--streams", type=int, default=32, help="constraints: concurrent streams")
    s.add_argument("--constrained", type=_percentages, default=[0, 50, 100], help="constraints: percentages")
    s.add_argument("--rounds", type=int, default=3, help="constraints: runs per row (median)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(run=_lazy("deploy.bench.sampler", "run_sampler_bench"))

    models = tuple(BENCH_MODELS)  # deploy/bench/presets.py: the tiny Scout, and hidden 256 x 8 MoE layers
    f = what.add_parser("failover", help="what a worker's death costs: stall, longest token gap, tok/s around it")
    f.add_argument("--models", type=_choices(models), default=list(models), help=f"comma-separated: {models}")
    f.add_argument("--replicas", type=positive_ints, default=[1, 2])
    f.add_argument("--workers", type=int, default=2)
    f.add_argument("--streams", type=int, default=8)
    f.add_argument("--tokens", type=int, default=200, help="per request (requests restart as they finish)")
    f.add_argument("--kills", type=int, default=5, help="worker kills per row, one at a time")
    f.add_argument("--window-s", type=float, default=3.0, help="throughput window before and after")
    f.add_argument("--settle-s", type=float, default=2.0, help="pause after starting and after each recovery")
    f.set_defaults(run=_lazy("deploy.bench.failover", "run_failover_bench"))

    r = what.add_parser("rebalance", help="a skewed load: max/mean load per worker before and after rebalancing")
    r.add_argument("--models", type=_choices(models), default=list(models), help=f"comma-separated: {models}")
    r.add_argument("--workers", type=int, default=4)
    r.add_argument("--redundant", type=int, default=2, help="redundant expert slots per worker")
    r.add_argument("--streams", type=int, default=16)
    r.add_argument("--tokens", type=int, default=64)
    r.set_defaults(run=_lazy("deploy.bench.rebalance", "run_rebalance_bench"))

    o = what.add_parser("routers", help="tok/s and ITL with 1, 2, 4 routers through gRPC; a router's death")
    o.add_argument("--model", choices=models, default="tiny")
    o.add_argument("--routers", type=positive_ints, default=[1, 2, 4])
    o.add_argument("--workers", type=int, default=2)
    o.add_argument("--concurrency", type=positive_ints, default=[8, 32, 64])
    o.add_argument("--tokens", type=int, default=64)
    o.set_defaults(run=_lazy("deploy.bench.routers", "run_routers_bench"))

    x = what.add_parser("prefix", help="multi-turn chat with a shared system prompt: prefix cache on vs off, routing")
    _bench_model(x, "moe-256")
    x.add_argument("--workers", type=int, default=2)
    x.add_argument("--users", type=int, default=16)
    x.add_argument("--turns", type=int, default=4)
    x.add_argument("--system-len", type=int, default=1500, help="tokens of the system prompt every user shares")
    x.add_argument("--user-len", type=int, default=100, help="tokens of each user message")
    x.add_argument("--new-tokens", type=int, default=24, help="greedy tokens of each answer")
    x.add_argument("--unshared-tokens", type=int, default=64, help="answer length of the no-sharing workload")
    x.add_argument("--no-routers2", dest="routers2", action="store_false", help="skip the 2-router deployments")
    x.add_argument("--seed", type=int, default=0)
    x.set_defaults(run=_lazy("deploy.bench.prefix", "run_prefix_bench"))


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected comma-separated values from {list(allowed)}, got {text!r}")
        return values

    return parse


def _device(parser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")


def _lazy(module: str, function: str):
    """The benchmark's entry point, imported only when that benchmark runs (torch, Ray and the engine load then,
    so `moecluster --help` stays fast)."""

    def run(args) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return run


def _run_vision(args) -> int:
    if "encode" in args.parts:
        from deploy.bench.vision import run_encode_bench

        run_encode_bench(args)
    if "itl" in args.parts:
        from deploy.bench.vision_itl import run_vision_itl_bench

        run_vision_itl_bench(args)
    return 0


def _non_negative_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def _percentages(text: str) -> list[int]:
    values = _non_negative_ints(text)
    if max(values) > 100:
        raise argparse.ArgumentTypeError(f"expected percentages in [0, 100], got {text!r}")
    return values


def _expert_dtypes(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in ("auto", "fp8", "model") for v in values):
        raise argparse.ArgumentTypeError(f"expected a list of auto, fp8, model like model,fp8, got {text!r}")
    return values


def _bench_model(parser, default: str) -> None:
    parser.add_argument(
        "--bench-model",
        choices=sorted(BENCH_MODELS),
        default=default,
        help="the checkpoint to generate without --model: tiny (hidden 64, 4 MoE layers) or moe-256 (hidden 256, "
        "8 MoE layers, 16 experts 512 wide, top-1)",
    )


def _counts(text: str) -> list[int]:
    """ "0,1,2" -> [0, 1, 2]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = [-1]
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0 like 0,1,2, got {text!r}")
    return values


def _micro_batches(text: str) -> list[int | None]:
    """ "auto,1,2" -> [None, 1, 2]."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or not all(v == "auto" or (v.isdigit() and 1 <= int(v) <= 8) for v in values):
        raise argparse.ArgumentTypeError(f"expected a list of auto or 1..8 like auto,1,2, got {text!r}")
    return [None if v == "auto" else int(v) for v in values]


def _run_moe_layer(args) -> int:
    from deploy.bench.moe_layer import run_moe_layer_bench

    cuda = args.device.startswith("cuda")
    args.hidden = args.hidden or (5120 if cuda else 1024)
    args.width = args.width or (8192 if cuda else 2048)
    return run_moe_layer_bench(args)


def _fronts(text: str) -> list[str]:
    fronts = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in fronts if f not in FRONTS]
    if bad or not fronts:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(FRONTS)} separated by commas, got {text!r}")
    return list(dict.fromkeys(fronts))
