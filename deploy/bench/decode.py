"""Greedy decode throughput of this implementation beside transformers' `generate`, same checkpoint, same run."""

from __future__ import annotations

import statistics
import time

import torch

from deploy.bench.models import bench_checkpoint, load_transformers
from router.reference.decode import Generator
from router.request.sampling_params import SamplingParams


def run_decode_bench(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    with bench_checkpoint(args.model) as model_dir:
        _print(_measure(model_dir, args), args, model_dir)
    return 0


def _measure(model_dir: str, args) -> list[tuple]:
    ours = Generator.from_checkpoint(model_dir, device=args.device, dtype=args.dtype)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, ours.config.vocab_size, (args.prompt_len,), generator=gen).tolist()
    params = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=args.new_tokens, ignore_eos=True)
    rows = [("moecluster (LocalTransport)", *_time(lambda: ours.generate(prompt, params).token_ids, args.repeats))]
    hf = load_transformers(model_dir, args.device, args.dtype)
    if hf is not None:

        def hf_run():
            ids = torch.tensor([prompt], device=args.device)
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
            )
            return out[0, len(prompt) :].tolist()

        rows.append(("transformers generate (baseline)", *_time(hf_run, args.repeats)))
    return rows


def _time(fn, repeats: int):
    with torch.inference_mode():
        tokens = fn()  # warm-up, and the tokens to compare
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times), tokens


def _print(rows, args, model_dir) -> None:
    print(
        f"greedy decode, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.repeats}, "
        f"{args.device} {args.dtype}, {torch.get_num_threads()} CPU threads, model {model_dir}"
    )
    print(f"{'implementation':<34} {'seconds':>9} {'tokens/s':>10} {'same tokens':>12}")
    reference = rows[0][2]
    for name, seconds, tokens in rows:
        same = "yes" if tokens == reference else "NO"
        print(f"{name:<34} {seconds:>9.3f} {args.new_tokens / seconds:>10.1f} {same:>12}")
