"""FP8 experts on a GPU (run by tests/device/run_gpu_checks.sh; `MOECLUSTER_CHECK_DEVICE=cpu` dry-runs it small):

1. exact path: a tiny FP8 checkpoint (both variants) in fp32 on the device gives transformers' greedy tokens on the
   dequantized weights (weights dequantized on the fly, fp32 activations);
2. sm90 path: one MoE layer at Scout's shape (D 5120, I 8192, 16 experts) with per-token dynamic FP8 activations
   and torch._scaled_grouped_mm, against bf16 on the dequantized weights: relative L2 error below FP8_TOLERANCE
   (e4m3 keeps 3 mantissa bits: activations round by up to 2^-4, about 2-4% over a 5120-long dot product), and
   the fixed-capacity exchange's padded call equal to the sorted call;
3. the layer's time, FP8 grouped vs bf16 grouped vs FP8 dequantize-per-expert, at several token counts.
"""

from __future__ import annotations

import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cluster.experts import ExpertShard, expert_segments
from cluster.fp8 import dequantize_rows, fp8_grouped_supported, quantize_rows

DEVICE = os.environ.get("MOECLUSTER_CHECK_DEVICE", "cuda")
SMALL = DEVICE == "cpu"
D, I, E = (256, 512, 4) if SMALL else (5120, 8192, 16)
TOKENS = (16, 64) if SMALL else (1, 64, 256, 1024, 4096)
FP8_TOLERANCE = 0.06  # relative L2 error of the W8A8 layer against bf16 on the dequantized weights


def tiny_parity() -> None:
    from transformers import Llama4ForCausalLM

    from deploy.tiny.fp8_layout import write_fp8_copy
    from router.reference.decode import Generator
    from router.request.sampling_params import SamplingParams
    from tests.cluster.test_fp8_checkpoints import PROMPTS, dequantized_copy, hf_greedy
    from tests.conftest import make_hf_model

    for scope in ("fp8", "fp8-mlp"):
        with tempfile.TemporaryDirectory() as d:
            make_hf_model(seed=5, interleave_moe_layer_step=2, use_qk_norm=False).save_pretrained(f"{d}/src")
            fp8 = write_fp8_copy(f"{d}/src", f"{d}/fp8", scope)
            oracle = dequantized_copy(fp8, Path(d) / "dq")
            hf = Llama4ForCausalLM.from_pretrained(oracle, dtype=torch.float32).to(DEVICE).eval()
            ours = Generator.from_checkpoint(fp8, device=DEVICE, dtype="float32")
            params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
            same = sum(ours.generate(p, params).token_ids == hf_greedy(hf, p, 24) for p in PROMPTS)
            print(f"fp8 {scope} tiny checkpoint, fp32 on {DEVICE}: {same} of {len(PROMPTS)} greedy prompts match")


def scout_layer() -> tuple[ExpertShard, ExpertShard]:
    """(FP8 shard, bf16 shard on its dequantized weights) with random Scout-shaped experts."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q_gu, s_gu, q_dn, s_dn = [], [], [], []
    for _ in range(E):
        q, s = quantize_rows(torch.randn(2 * I, D, generator=g).mul_(0.02).to(torch.bfloat16))
        q_gu.append(q), s_gu.append(s)
        q, s = quantize_rows(torch.randn(D, I, generator=g).mul_(0.02).to(torch.bfloat16))
        q_dn.append(q), s_dn.append(s)
    gu_EI2D, dn_EDI = torch.stack(q_gu).to(DEVICE), torch.stack(q_dn).to(DEVICE)
    sgu, sdn = torch.stack(s_gu).to(DEVICE), torch.stack(s_dn).to(DEVICE)
    fp8 = ExpertShard(tuple(range(E)), gu_EI2D.transpose(1, 2), dn_EDI.transpose(1, 2), sgu, sdn)
    gate_up = torch.stack([dequantize_rows(gu_EI2D[e], sgu[e], torch.bfloat16).T for e in range(E)]).contiguous()
    down = torch.stack([dequantize_rows(dn_EDI[e], sdn[e], torch.bfloat16).T for e in range(E)]).contiguous()
    return fp8, ExpertShard(tuple(range(E)), gate_up, down)


def rows(tokens: int) -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator(device="cpu").manual_seed(tokens)
    counts = torch.bincount(torch.randint(0, E, (tokens,), generator=g), minlength=E).tolist()
    return torch.randn(tokens, D, generator=g).to(DEVICE, torch.bfloat16), counts


def layer_parity(fp8: ExpertShard, bf16: ExpertShard) -> None:
    x, counts = rows(TOKENS[-1])
    grouped = fp8_grouped_supported(x, fp8.gate_up_EDI2, fp8.down_EID)
    ref = expert_segments(x, counts, bf16.gate_up_EDI2, bf16.down_EID, grouped=False).float()
    for name, use in (("fp8 grouped (W8A8)", True), ("fp8 dequantize per expert (W8A16)", False)):
        if use and not grouped:
            print(f"{name}: skipped, needs torch._scaled_grouped_mm on CUDA sm90+ (device {DEVICE})")
            continue
        got = expert_segments(x, counts, fp8.gate_up_EDI2, fp8.down_EID, grouped=use, scales=fp8.scales).float()
        err = ((got - ref).norm() / ref.norm()).item()
        tol = FP8_TOLERANCE if use else 1e-2
        print(
            f"{name} vs bf16 on the dequantized weights, {x.shape[0]} rows: rel L2 {err:.2e} (tol {tol}) ok={err < tol}"
        )
    if grouped:
        padded = torch.cat([x, torch.zeros(64, D, device=DEVICE, dtype=x.dtype)])
        y_pad = fp8.forward_padded(padded, torch.tensor(counts, device=DEVICE))[: x.shape[0]]
        y_sorted = fp8.forward_sorted(x, counts)
        print(f"fixed-capacity exchange (padded) == sorted: {torch.equal(y_pad, y_sorted)}")


def timing(fp8: ExpertShard, bf16: ExpertShard, iters: int = 20) -> None:
    print(f"MoE layer ms at D {D}, I {I}, {E} experts ({DEVICE}; bf16 grouped = torch._grouped_mm):")
    print(f"{'tokens':>7} {'bf16 grouped':>13} {'fp8 grouped':>12} {'fp8 dequant':>12}")
    fp8_args = (fp8.gate_up_EDI2, fp8.down_EID)
    for tokens in TOKENS:
        x, counts = rows(tokens)
        calls = {
            "bf16": partial(expert_segments, x, counts, bf16.gate_up_EDI2, bf16.down_EID, grouped=not SMALL),
            "fp8g": partial(expert_segments, x, counts, *fp8_args, grouped=True, scales=fp8.scales),
            "fp8d": partial(expert_segments, x, counts, *fp8_args, grouped=False, scales=fp8.scales),
        }
        if not fp8_grouped_supported(x, fp8.gate_up_EDI2, fp8.down_EID):
            del calls["fp8g"]
        ms = {k: _time_ms(f, iters) for k, f in calls.items()}
        print(f"{tokens:>7} {ms['bf16']:>13.3f} {ms.get('fp8g', float('nan')):>12.3f} {ms['fp8d']:>12.3f}")


def _time_ms(fn, iters: int) -> float:
    import time

    for _ in range(3):
        fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 / iters


if __name__ == "__main__":
    if DEVICE == "cuda":
        print(torch.__version__, torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
    tiny_parity()
    shards = scout_layer()
    layer_parity(*shards)
    timing(*shards, iters=3 if SMALL else 20)
