"""One MoE layer's routed experts at a chosen shape (default: Llama 4 Scout's on CUDA), random weights: the
per-expert loop and torch._grouped_mm beside transformers' Llama4TextExperts (every token through every
expert), same weights, same run. Also the all_to_all_single cost alone at world size 1 (`bench collective`).

Legend: T tokens, k experts per token, R = T*k rows, D hidden, I expert width, E experts.
"""

from __future__ import annotations

import datetime
import statistics
import time

import torch
import torch.distributed as dist

from cluster.experts import expert_segments, grouped_mm_supported
from cluster.weights import DTYPES


def _time_ms(fn, device: torch.device, iters: int) -> float:
    fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def run_moe_layer_bench(args) -> int:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    d, i, e, k = args.hidden, args.width, args.experts, args.top_k
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(e, d, 2 * i, generator=g) * d**-0.5).to(device, dtype)
    down = (torch.randn(e, i, d, generator=g) * i**-0.5).to(device, dtype)
    hf = _transformers_experts(gate_up, down) if args.baseline else None
    print(
        f"MoE experts, one layer: hidden {d}, expert width {i}, {e} experts, top-{k}, {dtype}, {device}; "
        f"median of {args.iters}"
    )
    cols = ["per-expert loop", "torch._grouped_mm", "transformers (dense)"]
    print(f"{'tokens':>7} " + " ".join(f"{c:>21}" for c in cols) + f" {'best GB/s':>10}")
    expert_bytes = 3 * d * i * gate_up.element_size()
    for tokens in args.tokens:
        x = torch.randn(tokens * k, d, generator=g).to(device, dtype)
        ids = torch.argsort(torch.rand(tokens, e, generator=g), 1)[:, :k].reshape(-1).to(device)
        order = torch.argsort(ids, stable=True)
        counts = torch.bincount(ids, minlength=e).tolist()
        xs = x[order]
        loop = _time_ms(lambda: expert_segments(xs, counts, gate_up, down, grouped=False), device, args.iters)
        grouped = (
            _time_ms(lambda: expert_segments(xs, counts, gate_up, down, grouped=True), device, args.iters)
            if grouped_mm_supported(xs, gate_up, down)
            else float("nan")
        )
        dense = (
            _time_ms(lambda: _dense(hf, x, ids, e, tokens, k), device, args.iters) if hf is not None else float("nan")
        )
        touched = sum(1 for c in counts if c) * expert_bytes
        best = min(v for v in (loop, grouped) if v == v)
        print(f"{tokens:>7} {loop:>21.3f} {grouped:>21.3f} {dense:>21.3f} {touched / best / 1e6:>10.0f}")
    return 0


def _transformers_experts(gate_up, down):
    try:
        from transformers import Llama4TextConfig
        from transformers.models.llama4.modeling_llama4 import Llama4TextExperts
    except ImportError:
        print("baseline skipped: transformers is not installed")
        return None
    e, d, i2 = gate_up.shape
    cfg = Llama4TextConfig(hidden_size=d, intermediate_size=i2 // 2, num_local_experts=e)
    with torch.device("meta"):
        experts = Llama4TextExperts(cfg)
    experts.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    experts.down_proj = torch.nn.Parameter(down, requires_grad=False)
    return experts


def _dense(hf, x_RD, ids_R, e, tokens, k):
    """transformers' formula: every expert sees every token, scaled by its gate (0 for unselected)."""
    x_TD = x_RD.view(tokens, k, -1)[:, 0]
    scores_TE = torch.zeros(tokens, e, device=x_RD.device, dtype=x_RD.dtype)
    scores_TE.scatter_(1, ids_R.view(tokens, k), 1.0)
    routed_in = x_TD.repeat(e, 1) * scores_TE.T.reshape(-1, 1)
    with torch.inference_mode():
        return hf(routed_in)


def run_collective_bench(args) -> int:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        print(f"all_to_all_single at world size 1 ({backend}, {dtype}, hidden {args.hidden}), median of {args.iters}")
        print(f"{'tokens':>7} {'counts ms':>10} {'rows ms':>10} {'copy ms':>10}")
        for tokens in args.tokens:
            x = torch.randn(tokens, args.hidden, device=device, dtype=dtype)
            out = torch.empty_like(x)
            counts = torch.tensor([tokens], device=device)
            t_counts = _time_ms(lambda: dist.all_to_all_single(torch.empty_like(counts), counts), device, args.iters)
            t_rows = _time_ms(lambda: dist.all_to_all_single(out, x, [tokens], [tokens]), device, args.iters)
            t_copy = _time_ms(lambda: out.copy_(x), device, args.iters)
            print(f"{tokens:>7} {t_counts:>10.3f} {t_rows:>10.3f} {t_copy:>10.3f}")
    finally:
        dist.destroy_process_group()
    return 0
