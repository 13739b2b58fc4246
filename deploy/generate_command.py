"""`moecluster generate`: run prompts through the model and print the results, in this process
(`--workers 0`) or on an embedded Ray cluster of one router and N expert workers that the command starts and
stops."""

from __future__ import annotations

import argparse
import json
import sys

from cluster.config import load_model_config
from router.generator import check_prompt, load_generation_config
from router.sampling_params import SamplingParams
from router.tokenizer import Tokenizer


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
    p.add_argument("--workers", type=int, default=0, help="expert workers on an embedded Ray cluster (0: in-process)")
    p.add_argument("--placement", default=None, help="experts per worker, e.g. '0-5;6-10;11-15' (default: even split)")
    p.add_argument("--collective-timeout", type=float, default=60.0, help="seconds before a stuck all-to-all fails")
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
    params, prompts, tokenizer = _prepare(args)
    if args.workers == 0:
        from router.generator import Generator

        gen = Generator.from_checkpoint(args.model, device=args.device, dtype=args.dtype)
        results = (_as_dict(gen.generate(ids, params)) for ids in prompts)
        _print_all(results, tokenizer, args.json)
        return 0
    from deploy.launcher import Cluster, ClusterSpec

    spec = ClusterSpec(args.model, args.workers, device=args.device, dtype=args.dtype, placement=args.placement,
                       collective_timeout_s=args.collective_timeout)
    with Cluster.start(spec) as cluster:
        _print_all((cluster.generate(ids, params) for ids in prompts), tokenizer, args.json)
    return 0


def _prepare(args):
    """Everything checkable before loading weights or starting actors."""
    from deploy.cli import UsageError

    if not args.prompt and not args.prompt_ids:
        raise UsageError("give at least one --prompt TEXT or --prompt-ids 1,2,3")
    if any(not text for text in args.prompt):
        raise UsageError("--prompt: the prompt is empty")
    if any(not ids for ids in args.prompt_ids):
        raise UsageError("--prompt-ids: the prompt is empty")
    if args.workers < 0:
        raise UsageError(f"--workers: expected an integer >= 0, got {args.workers}")
    _check_device(args.device)
    cfg = load_model_config(args.model)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        seed=args.seed, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
    ).with_defaults(load_generation_config(args.model)).validate()
    tokenizer = Tokenizer.from_dir(args.model)
    if args.prompt and tokenizer is None:
        raise UsageError(f"--prompt: {args.model} has no tokenizer.json; pass token ids with --prompt-ids")
    prompts = [tokenizer.encode(t) for t in args.prompt] + list(args.prompt_ids)
    for ids in prompts:
        check_prompt(cfg, ids, params.max_tokens)
    if args.workers:
        from cluster.placement import ExpertPlacement

        if args.placement:
            placement = ExpertPlacement.from_spec(args.placement, cfg.num_local_experts, cfg.moe_layers)
            if placement.num_workers != args.workers:
                raise UsageError(f"--placement names {placement.num_workers} workers but --workers is {args.workers}")
        else:
            ExpertPlacement.even(cfg.num_local_experts, cfg.moe_layers, args.workers)
    return params, prompts, tokenizer


def _as_dict(result) -> dict:
    return {"token_ids": result.token_ids, "finish_reason": result.finish_reason}


def _print_all(results, tokenizer, as_json: bool) -> None:
    for result in results:
        text = tokenizer.decode(result["token_ids"]) if tokenizer else ""
        if as_json:
            print(json.dumps({"token_ids": result["token_ids"], "text": text, "finish_reason": result["finish_reason"]}))
        else:
            print(text if tokenizer else " ".join(map(str, result["token_ids"])))
        sys.stdout.flush()


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
