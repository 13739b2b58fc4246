"""What images arriving cost the text streams already running: the inter-token latency of N greedy text streams
through the gRPC gateway, alone and while image requests arrive back to back (each a fresh image, so none comes
from the cache), with the images encoded by a vision encoder actor (`--vision-encoders 1`) and by the router
itself on a thread beside its engine (`--vision-encoders 0`), same run, same checkpoint.

The checkpoint is the tiny text model with a vision tower of Llama 4 Scout's widths (1408 hidden, 16 heads, 336-pixel
tiles of 144 `<|patch|>` tokens, adapter 4096) and `--tower-layers` encoder layers instead of 34, random weights: an
image costs real encode time, the text model's steps stay the tiny model's. An image's prompt also prefills in the
shared batch; that, not the encode, is the part of its cost that continuous batching puts on the other streams.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import tempfile
import time

from deploy.config import parse_serve_config
from deploy.server import Server
from deploy.tiny.model import write_tiny_model
from deploy.tiny.squares import QUESTION, square_png
from protos.async_client import AsyncInferenceClient

SCOUT_TOWER = {  # Llama 4 Scout's vision widths; the layer count comes from --tower-layers
    "hidden_size": 1408,
    "num_attention_heads": 16,
    "intermediate_size": 5632,
    "image_size": 336,
    "patch_size": 14,
    "projector_input_dim": 4096,
    "projector_output_dim": 4096,
    "vision_output_dim": 4096,
}


def run_vision_itl_bench(args) -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tower = {**SCOUT_TOWER, "num_hidden_layers": args.tower_layers}
        model_dir = str(write_tiny_model(tmp, "scout", train_steps=0, vision=True, vision_overrides=tower))
        for encoders in args.vision_encoders:
            server = _serve(model_dir, encoders, args)
            try:
                asyncio.run(_streams(server.target, 2, 8, images=True))  # warm-up
                runs = {False: [], True: []}
                for _ in range(args.rounds):  # interleaved, so a neighbour's load on the machine falls on both
                    for images in (False, True):
                        runs[images].append(asyncio.run(_streams(server.target, args.streams, args.tokens, images)))
                rows += [(encoders, images, _pooled(runs[images])) for images in (False, True)]
            finally:
                server.stop(grace_s=2.0)
    _print(rows, args)
    return 0


def _serve(model_dir: str, encoders: int, args) -> Server:
    config = parse_serve_config(
        {
            "model": {"path": model_dir},
            "cluster": {"workers": args.workers, "vision_encoders": encoders},
            "gateway": {"port": 0, "http_port": 0},
        }
    )
    return Server(config, show_progress=False).start()


async def _streams(target: str, n: int, tokens: int, images: bool) -> tuple[list[float], list[float]]:
    """(every gap between two tokens of a text stream, every image request's time to first token)."""
    async with AsyncInferenceClient(target) as client:
        done = asyncio.Event()
        arrivals = asyncio.ensure_future(_images_arriving(client, done)) if images else None
        results = await asyncio.gather(*(_text(client, i, tokens) for i in range(n)))
        done.set()
        image_ttfts = await arrivals if arrivals else []
    return [gap for stream in results for gap in stream], image_ttfts


def _pooled(runs: list[tuple[list[float], list[float]]]) -> dict:
    gaps = [gap for run_gaps, _ in runs for gap in run_gaps]
    image_ttfts = [t for _, ttfts in runs for t in ttfts]
    return {
        "itl_ms": 1e3 * statistics.mean(gaps),
        "p50_ms": 1e3 * statistics.median(gaps),
        "p99_ms": 1e3 * statistics.quantiles(gaps, n=100)[98],
        "max_ms": 1e3 * max(gaps),
        "images": len(image_ttfts),
        "image_ttft_s": statistics.mean(image_ttfts) if image_ttfts else 0.0,
    }


async def _text(client, i: int, tokens: int) -> list[float]:
    times = []
    gen = client.generate(input_ids=[1, 5 + i, 9, 40 + i], max_tokens=tokens, temperature=0.0, ignore_eos=True)
    async for chunk in gen:
        if chunk.token_ids:
            times.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(times)]


async def _images_arriving(client, done: asyncio.Event) -> list[float]:
    """Image requests one after another (a fresh image each) until the text streams end; their times to first
    token (encode + prefill)."""
    ttfts = []
    while not done.is_set():
        content = [{"type": "image", "data": square_png("red", 300, 300, next(_SEEDS))}, QUESTION]
        started = time.perf_counter()
        async for _ in client.generate(messages=[{"role": "user", "content": content}], max_tokens=1, temperature=0):
            ttfts.append(time.perf_counter() - started)
    return ttfts


_SEEDS = itertools.count(1000)  # a fresh image every time, across rounds: none is served from a router's cache


def _print(rows, args) -> None:
    print(
        f"vision ITL: {args.streams} greedy text streams x {args.tokens} tokens through the gRPC gateway, tiny text "
        f"model + a Scout-width vision tower of {args.tower_layers} layers (random weights), {args.workers} expert "
        f"workers, cpu ({os.cpu_count()} cores); images: 300x300 PNGs (1 tile, 147 prompt tokens) sent back to back; "
        f"{args.rounds} rounds of each, interleaved"
    )
    header = ("encoders", "images", "mean ITL ms", "p50 ms", "p99 ms", "max gap ms", "images done", "image TTFT s")
    table = [header] + [
        (
            f"{encoders} ({'actor' if encoders else 'in router'})",
            "arriving" if images else "none",
            f"{m['itl_ms']:.1f}",
            f"{m['p50_ms']:.1f}",
            f"{m['p99_ms']:.1f}",
            f"{m['max_ms']:.0f}",
            str(m["images"]),
            f"{m['image_ttft_s']:.2f}" if images else "-",
        )
        for encoders, images, m in rows
    ]
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    for r in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))
