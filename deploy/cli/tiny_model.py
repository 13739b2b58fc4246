"""`moecluster tiny-model`: write a small Llama 4 checkpoint in the Hugging Face layout, with a tiny vision tower
(Llama4ForConditionalGeneration) unless --text-only."""

from __future__ import annotations

from deploy.cli.usage import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("tiny-model", help="write a small random (or briefly trained) Llama 4 checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--preset", default="scout", help="scout (every layer MoE) or maverick (MoE every second layer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=None, help="0 = random weights; default: a short demo training")
    p.add_argument(
        "--text-only", action="store_true", help="no vision tower (a text-only Llama4ForCausalLM checkpoint)"
    )
    p.add_argument(
        "--quantize",
        default=None,
        help="write it in the official FP8 layout (compressed-tensors, per-channel scales): fp8 = routed experts "
        "only (as Meta's Maverick FP8), fp8-mlp = also the shared expert and dense MLPs (llm-compressor's "
        "FP8_DYNAMIC)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from deploy.tiny.fp8_layout import SCOPES
    from deploy.tiny.model import PRESETS, write_tiny_model  # torch: loaded only when this command runs

    if args.preset not in PRESETS:
        raise UsageError(f"--preset: expected one of {sorted(PRESETS)}, got {args.preset!r}")
    if args.train_steps is not None and args.train_steps < 0:
        raise UsageError(f"--train-steps: expected an integer >= 0, got {args.train_steps}")
    if args.quantize is not None and args.quantize not in SCOPES:
        raise UsageError(f"--quantize: expected one of {sorted(SCOPES)}, got {args.quantize!r}")
    path = write_tiny_model(
        args.out_dir,
        args.preset,
        seed=args.seed,
        train_steps=args.train_steps,
        vision=not args.text_only,
        quantize=args.quantize,
    )
    print(path)
    return 0
