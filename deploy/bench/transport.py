"""Per MoE layer: dispatch + combine through the all-to-all transport (1, 2, 4 workers) beside the same rows
through the in-process experts, same checkpoint, same run."""

from __future__ import annotations

import ray
import torch

from cluster.checkpoint import CheckpointReader
from cluster.config import load_model_config
from cluster.transport import LocalTransport
from cluster.weights import load_all_experts, resolve_dtype
from deploy.bench.exchange_timer import ExchangeBenchRouter, time_exchange
from deploy.bench.models import bench_checkpoint
from deploy.cluster_config import ClusterConfig
from deploy.deployment import Deployment, DeploymentSpec

# A checkpoint wide enough that expert compute is not all overhead, still quick to write on a laptop.
BENCH_DIMS = {"hidden_size": 512, "intermediate_size": 1024, "num_local_experts": 16}


def run_transport_bench(args) -> int:
    with bench_checkpoint(args.model, overrides=BENCH_DIMS) as model_dir:
        table = in_process_ms(model_dir, args)
        for workers in args.workers:
            for (tokens, _), ms in with_workers_ms(model_dir, workers, args, paths=(None,)).items():
                table[(tokens, workers)] = ms
        _print(table, model_dir, args)
    return 0


def in_process_ms(model_dir: str, args) -> dict[tuple[int, int], float]:
    """(tokens, 0) -> mean over MoE layers of the median ms of one exchange through the in-process experts."""
    cfg = load_model_config(model_dir)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, cfg, device)
    local = LocalTransport(load_all_experts(cfg, CheckpointReader(model_dir), device, dtype))
    table = {}
    for tokens in args.tokens:
        per_layer = time_exchange(
            local,
            list(cfg.moe_layers),
            tokens,
            cfg.num_experts_per_tok,
            cfg.num_local_experts,
            cfg.hidden_size,
            device,
            dtype,
            args.iters,
        )
        table[(tokens, 0)] = sum(per_layer.values()) / len(per_layer)
    return table


def with_workers_ms(model_dir: str, workers: int, args, paths) -> dict[tuple[int, str | None], float]:
    """(tokens, path) -> the same through a deployment with `workers` expert workers; path None: as serving
    chooses, "fixed" or "split": forced."""
    cluster = ClusterConfig(device="cuda" if args.device.startswith("cuda") else "cpu", workers=workers)
    spec = DeploymentSpec(model_dir, cluster, dtype=args.dtype, router_class=ExchangeBenchRouter, show_progress=False)
    table = {}
    with Deployment.start(spec) as deployment:
        for tokens in args.tokens:
            for path in paths:
                per_layer = ray.get(deployment.router.time_exchange.remote(tokens, args.iters, path), timeout=600)
                table[(tokens, path)] = sum(per_layer.values()) / len(per_layer)
    return table


def _print(table, model_dir, args) -> None:
    cfg = load_model_config(model_dir)
    print(
        f"MoE exchange, ms per MoE layer (median of {args.iters} steps, mean over {len(cfg.moe_layers)} layers); "
        f"hidden {cfg.hidden_size}, expert width {cfg.intermediate_size}, {cfg.num_local_experts} experts, "
        f"top-{cfg.num_experts_per_tok}, device {args.device}"
    )
    head = f"{'tokens':>7} {'in-process experts':>19}" + "".join(
        f" {f'{w} worker' + ('s' if w > 1 else '') + ' a2a':>15}" for w in args.workers
    )
    print(head)
    for tokens in args.tokens:
        row = f"{tokens:>7} {table[(tokens, 0)]:>19.3f}"
        row += "".join(f" {table[(tokens, w)]:>15.3f}" for w in args.workers)
        print(row)
    print("a2a = dispatch + combine through torch.distributed all_to_all_single, including the workers' expert compute")
