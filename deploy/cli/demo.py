"""`moecluster demo`: the embedded default, end to end. Makes (once) the tiny trained Llama 4 model, starts a
local Ray with the router, 2 expert workers and a vision encoder, the gRPC gateway on localhost, then sends a few
requests through the gRPC client (chats, a plain prompt, and an image of a coloured square asked about) and
streams their text to the terminal, shows where the experts live and how many tokens each served, and stops
everything (or keeps serving with --keep-serving)."""

from __future__ import annotations

import sys
import threading

from deploy.cli.status_table import format_status
from deploy.config import apply_overrides, load_serve_config
from protos.client import InferenceClient

DEMO_CHATS = ("count from 17", "count from 58")
DEMO_PROMPTS = ("80 81 82 83",)
DEMO_SQUARE = "red"  # the colour of the square in the demo's image


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="serve the tiny model locally and stream a few answers over gRPC")
    p.add_argument("--workers", type=int, default=2, help="expert workers (0: the router holds every expert)")
    p.add_argument(
        "--vision-encoders", type=int, default=None, help="vision encoder actors (default 1; 0: the router encodes)"
    )
    p.add_argument("--chat", action="append", default=None, help="a user message to send (repeatable)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--keep-serving", action="store_true", help="keep serving after the demo until Ctrl-C")
    p.set_defaults(run=run)


def run(args) -> int:
    from deploy.server import Server  # ray and torch: loaded only when this command runs

    config = apply_overrides(
        load_serve_config(None),
        workers=args.workers,
        vision_encoders=args.vision_encoders,
        host="127.0.0.1",
        port=0,
        http_port=0,
    )
    with Server(config) as server:
        print(f"moecluster serving {server.model_name} on {server.target}", flush=True)
        _talk(server.target, args.chat or list(DEMO_CHATS), args.max_tokens)
        if args.keep_serving:
            print(
                f"serving on {server.target} until Ctrl-C; try: moecluster client generate --target "
                f'{server.target} "count from 7"',
                flush=True,
            )
            _wait_for_interrupt()
    return 0


def _talk(target: str, chats: list[str], max_tokens: int) -> None:
    with InferenceClient(target) as client:
        client.wait_until_serving(timeout=120)
        for text in chats:
            _stream(
                client.generate(messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0),
                f"user: {text}\nassistant: ",
            )
        for text in DEMO_PROMPTS:
            _stream(client.generate(text, max_tokens=12, temperature=0), f"prompt: {text}\ncontinued: {text}")
        if client.model_info().accepts_images:
            _ask_about_a_square(client, max_tokens)
        print()
        print(format_status(client.cluster_status(), client.model_info(), client.health_status()))


def _ask_about_a_square(client: InferenceClient, max_tokens: int) -> None:
    from deploy.tiny.squares import QUESTION, square_png  # torch and Pillow: only when a model takes images

    png = square_png(DEMO_SQUARE)
    content = [{"type": "image", "data": png}, {"type": "text", "text": QUESTION}]
    _stream(
        client.generate(messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0),
        f"user: [image: a {DEMO_SQUARE} square, {len(png)} bytes of PNG] {QUESTION}\nassistant: ",
    )


def _stream(gen, header: str) -> None:
    sys.stdout.write(header)
    for chunk in gen:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    print(f"   [{gen.result.finish_reason}, {gen.result.completion_tokens} tokens]")


def _wait_for_interrupt() -> None:
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
