"""`moecluster generate`: run prompts through the model in this process and print the results."""

from __future__ import annotations

import argparse
import json
import sys

from router.generator import Generator, load_generation_config
from router.sampling_params import SamplingParams


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint directory")
    p.add_argument("--model", required=True, help="Hugging Face Llama 4 checkpoint directory")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompt-ids", action="append", default=[], type=_ids, help="comma-separated token ids (repeatable)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy; default: generation_config.json")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(run=run)


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,3, got {text!r}") from None


def run(args) -> int:
    from deploy.cli import UsageError

    if not args.prompt and not args.prompt_ids:
        raise UsageError("give at least one --prompt TEXT or --prompt-ids 1,2,3")
    for text in args.prompt:
        if not text:
            raise UsageError("--prompt: the prompt is empty")
    for ids in args.prompt_ids:
        if not ids:
            raise UsageError("--prompt-ids: the prompt is empty")
    _check_device(args.device)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        seed=args.seed, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
    ).with_defaults(load_generation_config(args.model)).validate()
    gen = Generator.from_checkpoint(args.model, device=args.device, dtype=args.dtype)
    tokenizer = None
    if args.prompt:
        from router.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(args.model)
        if tokenizer is None:
            raise UsageError(f"--prompt: {args.model} has no tokenizer.json; pass token ids with --prompt-ids")
    prompts = [tokenizer.encode(t) for t in args.prompt] + list(args.prompt_ids)
    if tokenizer is None:
        from router.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(args.model)
    for ids in prompts:
        gen.check_prompt(ids, params.max_tokens)
    for ids in prompts:
        result = gen.generate(ids, params)
        text = tokenizer.decode(result.token_ids) if tokenizer else ""
        if args.json:
            print(json.dumps({"token_ids": result.token_ids, "text": text, "finish_reason": result.finish_reason}))
        else:
            print(text if tokenizer else " ".join(map(str, result.token_ids)))
        sys.stdout.flush()
    return 0


def _check_device(device: str) -> None:
    import torch

    from deploy.cli import UsageError

    if device == "cpu":
        return
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        return
    raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
