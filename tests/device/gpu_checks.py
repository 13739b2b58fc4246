"""Checks and benchmarks for a GPU machine, in one call (the README's "GPU checks" line):

    bash tests/device/run_gpu_checks.sh        (on the device; writes logs under $OUT)

1. parity on CUDA: fp32 logits vs transformers' Llama4ForCausalLM on the same GPU, greedy tokens identical;
2. bf16 on CUDA: greedy tokens of the tiny models against fp32 (how many agree; bf16 is not exact);
Then the shell script runs the benchmarks: decode, MoE layer at Scout shape, NCCL all_to_all at world size 1,
and the serving engine, each beside its baseline.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cluster.batch import ForwardBatch, SeqSlice
from router.reference.contiguous_cache import ContiguousKVCache
from router.reference.decode import Generator
from router.request.sampling_params import SamplingParams
from tests.conftest import LLAMA3_ROPE, make_hf_model

DEVICE = os.environ.get("MOECLUSTER_CHECK_DEVICE", "cuda")  # "cpu" to dry-run this script here
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def parity(name: str, overrides: dict) -> None:
    with tempfile.TemporaryDirectory() as d:
        hf = make_hf_model(**overrides)
        hf.save_pretrained(d)
        hf = hf.to(DEVICE)
        ours = Generator.from_checkpoint(d, device=DEVICE, dtype="float32")
        ids = list(range(3, 48))
        with torch.no_grad():
            ref = hf(torch.tensor([ids], device=DEVICE)).logits[0]
            got = ours.runner.forward(
                torch.tensor(ids, device=DEVICE),
                ForwardBatch((SeqSlice(0, len(ids), 0, 0),)),
                ContiguousKVCache(),
                all_logits=True,
            )
            gen_ref = hf.generate(
                torch.tensor([[1, 17, 33, 250, 9]], device=DEVICE),
                max_new_tokens=40,
                min_new_tokens=40,
                do_sample=False,
            )[0, 5:].tolist()
        gen = ours.generate([1, 17, 33, 250, 9], GREEDY).token_ids
        print(
            f"parity {name}: fp32 {DEVICE} max |dlogit| = {(got - ref).abs().max().item():.2e}, "
            f"greedy 40 tokens identical: {gen == gen_ref}"
        )


def bf16_agreement() -> None:
    from deploy.tiny.model import write_tiny_model

    for preset in ("scout", "maverick"):
        with tempfile.TemporaryDirectory() as d:
            write_tiny_model(d, preset, train_steps=0)
            fp32 = (
                Generator.from_checkpoint(d, device=DEVICE, dtype="float32").generate([1, 5, 9, 13], GREEDY).token_ids
            )
            bf16 = (
                Generator.from_checkpoint(d, device=DEVICE, dtype="bfloat16").generate([1, 5, 9, 13], GREEDY).token_ids
            )
            same = next((i for i, (a, b) in enumerate(zip(fp32, bf16)) if a != b), len(fp32))
            print(f"bf16 vs fp32 on {DEVICE}, tiny {preset}: first {same} of {len(fp32)} greedy tokens agree")


if __name__ == "__main__":
    if DEVICE == "cuda":
        print(torch.__version__, torch.cuda.get_device_name(), "NCCL", torch.cuda.nccl.version())
    parity("scout-like (top-1, qk-norm, llama3 rope)", dict(rope_parameters=LLAMA3_ROPE))
    parity("maverick-like top-2", dict(interleave_moe_layer_step=2, num_experts_per_tok=2, use_qk_norm=False))
    bf16_agreement()
