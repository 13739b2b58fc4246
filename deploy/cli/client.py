"""`moecluster client <what> --target HOST:PORT`: talk to a running `moecluster serve` over gRPC.

  generate  streams the text to the terminal as it arrives (--json: one JSON object at the end)
  status    the cluster's placement and load as a table (router KV usage, running/waiting, per-worker experts
            and routed tokens)
  info      the served model
  rebalance (admin) recompute the expert map from the load each expert served, and apply it without stopping

A non-OK status prints `error: CODE: message` on stderr; exit status 2 for a bad request, 1 otherwise.

A gateway with TLS: --tls-ca FILE (or --tls for the system's roots); mutual TLS: --tls-cert FILE --tls-key FILE;
API keys: --api-key-file FILE or $MOECLUSTER_API_KEY. A key is never a flag's value: the command line is visible
to every user of the machine.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from deploy.cli.arg_types import token_ids
from deploy.cli.sampling_args import add_sampling_args, sampling_from_args, wire_sampling
from deploy.cli.status_table import format_status
from deploy.cli.usage import UsageError
from protos.client import InferenceClient
from protos.client_types import GenerationError
from router.gateway.api_keys import ApiKeyError, check_key, read_key_file

API_KEY_ENV = "MOECLUSTER_API_KEY"


def add_parser(sub) -> None:
    p = sub.add_parser("client", help="talk to a running server over gRPC")
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    # allow_abbrev=False: `--api-key SECRET` must not pass for `--api-key-file SECRET`
    g = what.add_parser("generate", help="stream a generation to the terminal", allow_abbrev=False)
    _target(g)
    g.add_argument("prompt", nargs="?", default=None, help="prompt text")
    g.add_argument("--input-ids", type=token_ids, default=None, help="comma-separated token ids instead of text")
    g.add_argument("--chat", action="store_true", help="send the prompt as one user message (chat format)")
    g.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image to send (repeatable): with --chat, before the text in the user message; otherwise one per "
        "<|image|> in the prompt",
    )
    add_sampling_args(g)
    g.add_argument("--model", default="", help="model name to check against the server's (default: any)")
    g.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    g.add_argument("--cache-salt", default="", help="requests with different salts share no cached KV")
    g.add_argument("--json", action="store_true", help="print one JSON object with the whole result")
    g.set_defaults(run=run_generate)
    s = what.add_parser("status", help="placement and load of the cluster", allow_abbrev=False)
    _target(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=run_status)
    i = what.add_parser("info", help="the served model", allow_abbrev=False)
    _target(i)
    i.set_defaults(run=run_info)
    r = what.add_parser(
        "rebalance", help="admin: recompute the expert map from the routed load and apply it", allow_abbrev=False
    )
    _target(r)
    r.set_defaults(run=run_rebalance)


def _target(p) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the server")
    p.add_argument("--tls", action="store_true", help="TLS, verified against the system's root certificates")
    p.add_argument("--tls-ca", metavar="FILE", default=None, help="TLS, verified against this CA (PEM)")
    p.add_argument("--tls-cert", metavar="FILE", default=None, help="mutual TLS: this client's certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", default=None, help="mutual TLS: this client's private key (PEM)")
    p.add_argument(
        "--api-key-file",
        metavar="FILE",
        default=None,
        help=f"a file holding the API key (default: ${API_KEY_ENV}, if set)",
    )


def connect(args) -> InferenceClient:
    """The client the connection flags ask for; UsageError naming the flag when one cannot be used."""
    for flag in ("tls_ca", "tls_cert", "tls_key", "api_key_file"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"--{flag.replace('_', '-')}: {path} is not a file")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together (mutual TLS)")
    return InferenceClient(
        args.target,
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        api_key=_api_key(args.api_key_file),
    )


def _api_key(path: str | None) -> str | None:
    try:
        if path is None:
            value = os.environ.get(API_KEY_ENV, "").strip()
            return check_key(value, f"${API_KEY_ENV}") if value else None
        keys = read_key_file(path)
    except ApiKeyError as e:
        raise UsageError(f"--api-key-file: {e}" if path else str(e)) from None
    if len(keys) != 1:
        raise UsageError(f"--api-key-file: expected one key in {path}, found {len(keys)}")
    return keys[0]


def run_generate(args) -> int:

    if (args.prompt is None) == (args.input_ids is None):
        raise UsageError("give a prompt or --input-ids (one of them)")
    if args.chat and args.prompt is None:
        raise UsageError("--chat needs a prompt text")
    images = [_read_image(path) for path in args.image]
    sampling = wire_sampling(sampling_from_args(args))
    if args.chat:
        inputs = {"messages": [("user", [*images, args.prompt] if images else args.prompt)]}
    else:
        inputs = {"prompt": args.prompt} if args.prompt is not None else {"input_ids": args.input_ids}
        inputs["images"] = images
    with connect(args) as client:
        return _guard(lambda: _generate(client, args, inputs, sampling), args)


def _generate(client, args, inputs: dict, sampling: dict) -> int:
    gen = client.generate(**inputs, model=args.model, timeout=args.timeout, cache_salt=args.cache_salt, **sampling)
    for chunk in gen:
        if not args.json:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    r = gen.result
    if args.json:
        print(
            json.dumps(
                {
                    "request_id": r.request_id,
                    "token_ids": r.token_ids,
                    "text": r.text,
                    "finish_reason": r.finish_reason,
                    "matched_stop": r.matched_stop,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "cached_tokens": r.cached_tokens,
                }
            )
        )
    else:
        sys.stdout.write("\n")
        cached = f", {r.cached_tokens} prompt tokens from the cache" if r.cached_tokens else ""
        print(f"[{r.finish_reason}: {r.completion_tokens} tokens{cached}]", file=sys.stderr)
    return 0


def _read_image(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"--image: cannot read {path}: {e.strerror or e}") from None


def run_status(args) -> int:

    with connect(args) as client:

        def show() -> int:
            status, info = client.cluster_status(), client.model_info()
            if args.json:
                print(json.dumps(MessageToDict(status, preserving_proto_field_name=True)))
            else:
                print(format_status(status, info, client.health_status()))
            return 0

        return _guard(show, args)


def run_info(args) -> int:

    with connect(args) as client:
        return _guard(
            lambda: (
                print(json.dumps(MessageToDict(client.model_info(), preserving_proto_field_name=True), indent=1)) or 0
            ),
            args,
        )


def run_rebalance(args) -> int:
    with connect(args) as client:

        def rebalance() -> int:
            r = client.rebalance(timeout=600)
            if r.applied:
                print(
                    f"rebalanced: expert map generation {r.map_generation}; max/mean load per worker "
                    f"{r.imbalance_before:.2f} -> {r.imbalance_after:.2f}; {r.copies_loaded} expert copies loaded"
                )
            else:
                print(f"not rebalanced: {r.message} (expert map generation {r.map_generation})")
            return 0

        return _guard(rebalance, args)


def _guard(fn, args) -> int:
    try:
        return fn()
    except GenerationError as e:
        print(f"error: {e}{_connection_hint(e, args)}", file=sys.stderr)
        bad_request = e.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        return 2 if bad_request else 1


def _connection_hint(error: GenerationError, args) -> str:
    """A failed handshake reads "Socket closed" to the client: say what the likely cause is."""
    if error.code != grpc.StatusCode.UNAVAILABLE or "failed to connect" not in error.message:
        return ""
    if not (args.tls or args.tls_ca or args.tls_cert):
        return "\nhint: if the server uses TLS, give --tls-ca FILE (or --tls for a publicly signed certificate)"
    if args.tls_cert is None:
        return "\nhint: if the server asks for client certificates (mutual TLS), give --tls-cert FILE --tls-key FILE"
    return ""
