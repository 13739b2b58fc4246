"""`moecluster bench <what>`: benchmarks that print a table, each beside a baseline run in the same process."""

from __future__ import annotations


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


def _run_decode(args) -> int:
    from deploy.bench_decode import run_decode_bench

    return run_decode_bench(args)
