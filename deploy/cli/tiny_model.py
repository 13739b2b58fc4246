"""`moecluster tiny-model`: write a small Llama 4 checkpoint in the Hugging Face layout, with a tiny vision tower
(Llama4ForConditionalGeneration) unless --text-only. By default a copy of the trained checkpoint that ships in the
repository (the same weights on any CPU); --train, --seed, --train-steps or --text-only train one here instead."""

from __future__ import annotations

from deploy.cli.usage import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("tiny-model", help="write a small Llama 4 checkpoint: the shipped trained one, or train one")
    p.add_argument("out_dir")
    p.add_argument("--preset", default="scout", help="scout (every layer MoE) or maverick (MoE every second layer)")
    p.add_argument(
        "--train",
        action="store_true",
        help="train here instead of copying the shipped checkpoint (regenerates it: deploy/tiny/shipped.py)",
    )
    p.add_argument("--seed", type=int, default=None, help="training seed (implies --train; default 0)")
    p.add_argument("--train-steps", type=int, default=None, help="implies --train; 0 = random weights; default 800")
    p.add_argument(
        "--text-only", action="store_true", help="no vision tower (a text-only Llama4ForCausalLM checkpoint; trains)"
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
    from deploy.config import TINY_PRESETS
    from deploy.tiny.fp8_layout import SCOPES

    if args.preset not in TINY_PRESETS:
        raise UsageError(f"--preset: expected one of {sorted(TINY_PRESETS)}, got {args.preset!r}")
    if args.train_steps is not None and args.train_steps < 0:
        raise UsageError(f"--train-steps: expected an integer >= 0, got {args.train_steps}")
    if args.quantize is not None and args.quantize not in SCOPES:
        raise UsageError(f"--quantize: expected one of {sorted(SCOPES)}, got {args.quantize!r}")
    if args.train or args.seed is not None or args.train_steps is not None or args.text_only:
        from deploy.tiny.model import write_tiny_model  # torch: loaded only when training
        from deploy.tiny.shipped import SEED

        seed = SEED if args.seed is None else args.seed
        path = write_tiny_model(
            args.out_dir,
            args.preset,
            seed=seed,
            train_steps=args.train_steps,
            vision=not args.text_only,
            quantize=args.quantize,
        )
    elif args.quantize is not None:  # the shipped weights, in the official FP8 layout
        from deploy.tiny.fp8_layout import write_fp8_copy
        from deploy.tiny.shipped import shipped_dir

        path = write_fp8_copy(shipped_dir(args.preset), args.out_dir, args.quantize)
    else:
        from deploy.tiny.shipped import copy_shipped

        path = copy_shipped(args.preset, args.out_dir)
    print(path)
    return 0
