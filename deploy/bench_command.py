"""`moecluster bench <what>`: benchmarks that print a table, each beside a baseline run in the same process."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark and print a table")
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    d = what.add_parser("decode", help="single-process greedy decode tokens/s vs transformers' generate")
    d.add_argument("--model", default=None, help="checkpoint directory (default: a fresh tiny scout model)")
    d.add_argument("--prompt-len", type=int, default=32)
    d.add_argument("--new-tokens", type=int, default=64)
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    d.set_defaults(run=_run_decode)

    t = what.add_parser("transport", help="per MoE layer: all-to-all dispatch + combine vs in-process experts")
    t.add_argument("--model", default=None, help="checkpoint directory (default: a generated 512-wide, 16-expert model)")
    t.add_argument("--tokens", type=_ints, default=[1, 16, 256])
    t.add_argument("--workers", type=_ints, default=[1, 2, 4])
    t.add_argument("--iters", type=int, default=10)
    t.add_argument("--device", default="cpu")
    t.add_argument("--dtype", default="auto")
    t.set_defaults(run=_run_transport)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,16,256, got {text!r}")
    return values


def _run_transport(args) -> int:
    from deploy.bench_transport import run_transport_bench

    return run_transport_bench(args)


def _run_decode(args) -> int:
    from deploy.bench_decode import run_decode_bench

    return run_decode_bench(args)
