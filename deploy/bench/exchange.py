"""Per MoE layer: the fixed-capacity exchange (two collectives, rows padded to a capacity, no host sync) beside the
split one (three collectives, exact sizes), through 1 and 2 Ray expert workers, and the in-process experts as the
baseline; same checkpoint, same run. Where the two paths cross is where the fixed path should stop
(cluster/all_to_all.py FIXED_MAX_ROWS)."""

from __future__ import annotations

from cluster.all_to_all import FIXED_MAX_ROWS
from cluster.config import load_model_config
from deploy.bench.models import BENCH_MODELS, bench_checkpoint
from deploy.bench.transport import in_process_ms, with_workers_ms


def run_exchange_bench(args) -> int:
    with bench_checkpoint(args.model, BENCH_MODELS[args.bench_model]) as model_dir:
        baseline = in_process_ms(model_dir, args)
        remote = {w: with_workers_ms(model_dir, w, args, paths=("split", "fixed")) for w in args.workers}
        _print(baseline, remote, model_dir, args)
    return 0


def _print(baseline, remote, model_dir: str, args) -> None:
    cfg = load_model_config(model_dir)
    print(
        f"MoE exchange, ms per MoE layer (median of {args.iters} steps, mean over {len(cfg.moe_layers)} layers), "
        f"expert compute included; hidden {cfg.hidden_size}, expert width {cfg.intermediate_size}, "
        f"{cfg.num_local_experts} experts, top-{cfg.num_experts_per_tok}, {args.device}; serving takes the fixed "
        f"path up to {FIXED_MAX_ROWS} rows"
    )
    cols = ["in-process"] + [f"{w}w {path}" for w in args.workers for path in ("split", "fixed")]
    ratio_cols = [f"{w}w fixed/split" for w in args.workers]
    print(f"{'tokens':>7} " + " ".join(f"{c:>11}" for c in cols) + "".join(f" {c:>15}" for c in ratio_cols))
    for tokens in args.tokens:
        cells = [baseline[(tokens, 0)]] + [remote[w][(tokens, p)] for w in args.workers for p in ("split", "fixed")]
        ratios = [remote[w][(tokens, "fixed")] / remote[w][(tokens, "split")] for w in args.workers]
        print(f"{tokens:>7} " + " ".join(f"{c:>11.3f}" for c in cells) + "".join(f" {r:>15.2f}" for r in ratios))
