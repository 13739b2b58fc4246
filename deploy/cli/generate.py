"""`moecluster generate`: run prompts through the serving engine as one concurrent batch and print one result
per prompt, in the order given: in this process (`--workers 0`), or on an embedded Ray cluster of one router
and N expert workers that the command starts and stops.

A --messages file is a JSON list of {"role", "content"}; a content is a string or a list of parts, e.g.
[{"type": "text", "text": "What colour is the square?"}, {"type": "image", "path": "square.png"}] (a path relative to
the JSON file; or "url": a data: URL)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path

from cluster.config import load_model_config
from deploy.cli.arg_types import byte_size, token_ids
from deploy.cli.sampling_args import add_sampling_args, sampling_from_args
from deploy.cli.stdout import results_only
from deploy.cli.usage import UsageError, as_flags
from deploy.cluster_config import ClusterConfig
from router.engine.config import EngineConfig
from router.images.data_url import data_url_bytes
from router.request.errors import InvalidRequest
from router.request.generation_config import load_generation_config
from router.request.messages import ChatMessage, EngineRequest, ImagePart
from router.request.prepare import check_prompt
from router.request.sampling_params import SamplingParams


class _Inputs(argparse.Action):
    """Keeps --prompt, --prompt-ids and --messages in one list, in command-line order."""

    def __call__(self, parser, namespace, value, option_string=None):
        inputs = list(getattr(namespace, "inputs", None) or [])
        inputs.append((self.dest, value))
        namespace.inputs = inputs


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint directory")
    p.add_argument("--model", required=True, help="Hugging Face Llama 4 checkpoint directory")
    p.add_argument("--prompt", action=_Inputs, help="prompt text (repeatable)")
    p.add_argument("--prompt-ids", action=_Inputs, type=token_ids, help="comma-separated token ids (repeatable)")
    p.add_argument(
        "--messages",
        action=_Inputs,
        type=_messages,
        help="JSON file: a list of {role, content}, content a string or a list of text and image parts (repeatable)",
    )
    add_sampling_args(p, skip=("logprobs", "top_logprobs"))
    p.add_argument("--logprobs", type=int, default=None, metavar="N", help="return logprobs with N alternatives")
    p.add_argument("--workers", type=int, default=0, help="expert workers on an embedded Ray cluster (0: in-process)")
    p.add_argument(
        "--placement",
        default=None,
        help="experts per worker, e.g. '0-5;6-10;11-15' or with replicas '0-7;8-15;0-3,8-11' (default: even split)",
    )
    p.add_argument(
        "--expert-replicas",
        type=int,
        default=1,
        help="copies of each expert on distinct workers (default 1; 2 survives a worker's death without a stall)",
    )
    p.add_argument(
        "--routers",
        type=int,
        default=1,
        help="attention routers on the embedded Ray cluster; the prompts are spread over them (default 1)",
    )
    p.add_argument(
        "--vision-encoders",
        type=int,
        default=None,
        help="vision encoder actors (default: 1 with --workers or --routers when the model has a vision tower; "
        "0: the router encodes images itself)",
    )
    p.add_argument("--collective-timeout", type=float, default=60.0, help="seconds before a stuck all-to-all fails")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch")
    p.add_argument(
        "--kv-cache-memory",
        type=byte_size,
        default=None,
        help="KV cache budget, e.g. 512MiB or bytes (default: 256MiB on CPU, half the free GPU memory)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(run=run, inputs=None)


def _messages(path: str) -> tuple[ChatMessage, ...]:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e}") from None
    raw = raw.get("messages") if isinstance(raw, dict) else raw
    if not isinstance(raw, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in raw):
        raise argparse.ArgumentTypeError(f'{path}: expected a JSON list of {{"role": ..., "content": ...}}')
    return tuple(ChatMessage(str(m["role"]), _content(m["content"], Path(path), i)) for i, m in enumerate(raw))


def _content(content, path: Path, i: int):
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise argparse.ArgumentTypeError(f"{path}: messages[{i}].content: expected a string or a list of parts")
    return tuple(_part(part, path, f"messages[{i}].content[{j}]") for j, part in enumerate(content))


def _part(part, path: Path, where: str) -> str | ImagePart:
    if isinstance(part, str):  # text, as the Python clients take it
        return part
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if kind == "image" and isinstance(part.get("path"), str):
        image = path.parent / part["path"]
        try:
            return ImagePart(image.read_bytes())
        except OSError as e:
            raise argparse.ArgumentTypeError(f"{path}: {where}.path: cannot read {image}: {e.strerror}") from None
    if kind == "image" and isinstance(part.get("url"), str):
        try:
            return ImagePart(data_url_bytes(part["url"], f"{where}.url"))
        except InvalidRequest as e:
            raise argparse.ArgumentTypeError(f"{path}: {e}") from None
    raise argparse.ArgumentTypeError(
        f'{path}: {where}: expected {{"type": "text", "text": ...}} or {{"type": "image", "path": ...}} '
        f'(or "url": a data: URL), got {part!r}'
    )


def run(args) -> int:
    requests, engine_config, cluster_config = _prepare(args)
    if cluster_config is None:
        results = asyncio.run(_in_process(args, requests, engine_config))
    else:
        from deploy.deployment import Deployment, DeploymentSpec

        spec = DeploymentSpec(args.model, cluster_config, engine_config, dtype=args.dtype)
        with results_only(), Deployment.start(spec) as deployment:
            results = deployment.generate_batch(requests)
    for result in results:
        _print(result, args.json)
    errors = [r["error"] for r in results if r["finish_reason"] == "error"]
    if errors:
        print(f"error: {errors[0]}", file=sys.stderr)
        return 1
    return 0


async def _in_process(args, requests, engine_config) -> list[dict]:
    from cluster.checkpoint import CheckpointReader
    from router.engine.async_engine import AsyncEngine, collect
    from router.engine.engine import Engine
    from router.images.features import VisionSettings, image_features_for

    reader = CheckpointReader(args.model)
    engine = Engine.from_checkpoint(args.model, args.device, args.dtype, engine_config, reader=reader)
    vision = VisionSettings(cache_bytes=ClusterConfig().vision_cache_memory)  # encoders 0: this process encodes
    engine = AsyncEngine(engine, image_features_for(args.model, vision, args.device, args.dtype, reader))
    try:
        return list(await asyncio.gather(*(collect(engine.generate(r)) for r in requests)))
    finally:
        engine.shutdown()


def _prepare(args):
    """Everything checkable before loading weights or starting actors."""
    if not args.inputs:
        raise UsageError("give at least one --prompt TEXT, --prompt-ids 1,2,3 or --messages FILE.json")
    for kind, value in args.inputs:
        if not value:
            raise UsageError(f"--{kind.replace('_', '-')}: the prompt is empty")
    if args.workers < 0:
        raise UsageError(f"--workers: expected an integer >= 0, got {args.workers}")
    _check_device(args.device)
    cfg = load_model_config(args.model)
    params = SamplingParams(
        **sampling_from_args(args), logprobs=args.logprobs is not None, top_logprobs=args.logprobs or 0
    )
    params.with_defaults(load_generation_config(args.model)).validate(cfg.vocab_size)
    has_tokenizer = (Path(args.model) / "tokenizer.json").is_file()
    requests = []
    for kind, value in args.inputs:
        if kind != "prompt_ids" and not has_tokenizer:
            raise UsageError(
                f"--{kind.replace('_', '-')}: {args.model} has no tokenizer.json; pass token ids with --prompt-ids"
            )
        if kind == "prompt_ids":
            check_prompt(cfg, value, params.max_tokens)
        fields = (
            {"prompt": value}
            if kind == "prompt"
            else ({"prompt_ids": tuple(value)} if kind == "prompt_ids" else {"messages": value})
        )
        requests.append(EngineRequest(uuid.uuid4().hex, params, **fields))
    with as_flags(_FLAGS):
        engine_config = EngineConfig(max_num_seqs=args.max_num_seqs, kv_cache_memory=args.kv_cache_memory)
        cluster_config = None  # in this process
        if args.workers or args.routers != 1 or args.vision_encoders:
            cluster_config = ClusterConfig(
                device="cuda" if args.device.startswith("cuda") else "cpu",
                routers=args.routers,
                workers=args.workers,
                expert_replicas=args.expert_replicas,
                placement=args.placement,
                collective_timeout_s=args.collective_timeout,
                vision_encoders=args.vision_encoders,
            )
            cluster_config.expert_map(cfg)  # refuses a placement that cannot fit before any actor starts
    return requests, engine_config, cluster_config


# settings key -> the flag that sets it, for error messages
_FLAGS = {
    "max_num_seqs": "--max-num-seqs",
    "kv_cache_memory": "--kv-cache-memory",
    "workers": "--workers",
    "placement": "--placement",
    "expert_replicas": "--expert-replicas",
    "routers": "--routers",
    "collective_timeout_s": "--collective-timeout",
    "vision_encoders": "--vision-encoders",
    "device": "--device",
}


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    elif result["finish_reason"] != "error":
        print(result["text"] if result["text"] or not result["token_ids"] else " ".join(map(str, result["token_ids"])))
    sys.stdout.flush()


def _check_device(device: str) -> None:
    import torch

    if device == "cpu":
        return
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        return
    raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
