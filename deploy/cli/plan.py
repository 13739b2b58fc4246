"""`moecluster plan`: what each actor would hold on its GPU, each router's KV capacity, and whether the deployment
fits (deploy/plan.py), from a checkpoint's config.json alone. Exit status 0 when it fits, 1 when it does not."""

from __future__ import annotations

import json
from pathlib import Path

from deploy.cli.usage import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="the memory plan of a deployment: weights and KV per actor; exit 1 if it won't fit")
    p.add_argument("--model", required=True, help="checkpoint directory or its config.json")
    p.add_argument("--gpu", required=True, help="memory of each GPU: h100 (80 GB), h200 (141 GB) or a size (80GiB)")
    p.add_argument("--workers", type=int, required=True, help="expert workers (0: the router holds every expert)")
    p.add_argument("--routers", type=int, default=1)
    p.add_argument("--expert-replicas", type=int, default=1)
    p.add_argument("--vision-encoders", type=int, default=None, help="default: 1 when the model has a vision tower")
    p.add_argument(
        "--expert-dtype", default="auto", help="bf16, fp8 or auto (fp8 when the checkpoint's experts are FP8)"
    )
    p.add_argument("--block-size", type=int, default=None, help="KV cache block size (default: the scheduler's)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="(default: the scheduler's)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.set_defaults(run=run)


def run(args) -> int:
    from cluster.settings import SettingError, parse_bytes
    from deploy.cluster_config import ClusterConfig
    from deploy.plan import GPUS, Topology, memory_plan, stored_fp8_experts  # torch: loaded only now
    from router.engine.config import EngineConfig

    raw, source = _config(args.model)
    if args.expert_dtype not in ("auto", "bf16", "fp8"):
        raise UsageError(f"--expert-dtype: expected one of auto|bf16|fp8, got {args.expert_dtype!r}")
    try:
        gpu = GPUS.get(args.gpu.lower()) or parse_bytes(args.gpu)
    except ValueError as e:
        raise UsageError(f"--gpu: expected h100, h200 or a size like 80GiB; {e}") from None
    try:
        cluster = ClusterConfig(
            device="cuda",
            routers=args.routers,
            workers=args.workers,
            expert_replicas=args.expert_replicas,
            vision_encoders=args.vision_encoders,
        )
        engine = EngineConfig(
            **{k: v for k, v in (("block_size", args.block_size), ("max_num_seqs", args.max_num_seqs)) if v}
        )
    except SettingError as e:
        raise UsageError(f"--{e.key.replace('_', '-')}: {e.problem}") from None
    fp8 = args.expert_dtype == "fp8" or (args.expert_dtype == "auto" and stored_fp8_experts(raw, source))
    plan = memory_plan(raw, Topology(gpu, cluster, fp8, engine.block_size, engine.max_num_seqs), source)
    dense = memory_plan(raw, Topology(gpu, cluster, not fp8, engine.block_size, engine.max_num_seqs), source)
    print(json.dumps(_as_dict(plan, dense)) if args.json else _table(plan, dense, args.gpu, source))
    return 0 if plan.fits else 1


def _config(model: str) -> tuple[dict, str]:
    path = Path(model)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"--model: {model} is neither a checkpoint directory with a config.json nor a config.json")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise UsageError(f"--model: {path} is not valid JSON ({e})") from None


def _table(plan, other, gpu: str, source: str) -> str:
    from deploy.plan import GIB, RUNTIME_RESERVE

    t = plan.topology
    dtype, other_dtype = ("fp8", "bf16") if t.expert_fp8 else ("bf16", "fp8")
    lines = [
        f"model    {source}: routed experts in {dtype}",
        f"gpu      {gpu}: {t.gpu_bytes / GIB:.1f} GiB each, {(t.gpu_bytes - RUNTIME_RESERVE) / GIB:.1f} usable "
        f"({RUNTIME_RESERVE / GIB:.0f} GiB kept for the CUDA context and activations)",
        f"weights  {plan.model_bytes / GIB:.1f} GiB in all ({other.model_bytes / GIB:.1f} GiB with {other_dtype} "
        f"experts); over {plan.gpus} GPUs {plan.model_bytes / plan.gpus / GIB:.1f} GiB per GPU on average",
        "",
        f"{'actor':<11}{'weights':>12}{'KV tokens':>12}  fits",
    ]
    for a in plan.actors:
        kv = "-" if a.kv_tokens is None else str(a.kv_tokens)
        lines.append(
            f"{a.role + ' ' + str(a.index):<11}{a.weight_bytes / GIB:>8.1f} GiB{kv:>12}  {'yes' if a.fits else 'NO'}"
        )
    lines += ["", f"fits     {'yes' if plan.fits else 'no'} (KV block size {t.block_size})"]
    lines += [f"  - {p}" for p in plan.problems]
    return "\n".join(lines)


def _as_dict(plan, other) -> dict:
    t = plan.topology
    return {
        "fits": plan.fits,
        "gpu_bytes": t.gpu_bytes,
        "gpus": plan.gpus,
        "expert_dtype": "fp8" if t.expert_fp8 else "bf16",
        "model_bytes": plan.model_bytes,
        "model_bytes_other_expert_dtype": other.model_bytes,
        "block_size": t.block_size,
        "actors": [
            {"role": a.role, "index": a.index, "weight_bytes": a.weight_bytes, "kv_tokens": a.kv_tokens, "fits": a.fits}
            for a in plan.actors
        ],
        "problems": list(plan.problems),
    }
