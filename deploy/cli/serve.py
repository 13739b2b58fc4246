"""`moecluster serve`: the gRPC gateway, the router and the expert workers, in the foreground. Prints one line,
`moecluster serving <model> on HOST:PORT`, once readiness is SERVING; SIGTERM or SIGINT drains (readiness
NOT_SERVING, open streams finish within --drain-grace-s, the rest are aborted), then stops the cluster and the
Ray it started. A second signal skips what is left of the drain."""

from __future__ import annotations

import os
import signal
import threading
import time

from cluster.settings import SettingError
from deploy.cli.stdout import results_only
from deploy.cli.usage import UsageError
from deploy.cluster_config import ClusterConfig
from deploy.config import apply_overrides, load_serve_config
from deploy.logging_setup import setup_logging
from router.engine.config import EngineConfig
from router.gateway.config import GatewayConfig

# The defaults shown in --help are the settings' own (cluster/settings.py: one default per key, in one place).
_G, _E, _C = GatewayConfig(), EngineConfig(), ClusterConfig()


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over gRPC (gateway + router + expert workers)")
    p.add_argument(
        "--config",
        default=None,
        help="YAML serve configuration (deploy/configs/*.yaml; TLS and API keys are set only here); flags override it",
    )
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint directory (default: the tiny model, made once in "
        "$MOECLUSTER_CACHE or $XDG_CACHE_HOME/moecluster or ~/.cache/moecluster)",
    )
    p.add_argument("--model-name", default=None, help="served model name (default: the directory's name)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"expert workers (default {_C.workers}; 0: the router holds every expert)",
    )
    p.add_argument(
        "--routers",
        type=int,
        default=None,
        help=f"attention routers, each with its own engine and KV cache (default {_C.routers})",
    )
    p.add_argument(
        "--vision-encoders",
        type=int,
        default=None,
        help="vision encoder actors (default: 1 when the model has a vision tower, else 0; 0: each router encodes "
        "images itself)",
    )
    p.add_argument(
        "--placement",
        default=None,
        help="experts per worker, e.g. '0-5;6-10;11-15' or with replicas '0-7;8-15;0-3,8-11' (default: even)",
    )
    p.add_argument(
        "--expert-replicas",
        type=int,
        default=None,
        help="copies of each expert on distinct workers "
        f"(default {_C.expert_replicas}; 2 survives a worker's death without a stall)",
    )
    p.add_argument("--host", default=None, help=f"address to listen on (default {_G.host}; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=None, help=f"gRPC port (default {_G.port}; 0: any free port, printed)")
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        help=f"OpenAI-compatible HTTP port (default {_G.http_port}; 0: any free port, printed)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (one GPU per actor)")
    p.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Prometheus /metrics port; turns metrics on (default: off unless the config enables them; 0: any "
        "free port, logged)",
    )
    p.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=None,
        help=f"open Generate streams; beyond: RESOURCE_EXHAUSTED (default {_G.max_concurrent_streams})",
    )
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        help="requests waiting in the engine; beyond: "
        f"RESOURCE_EXHAUSTED (default {_G.max_queued_requests}; 0: no bound)",
    )
    p.add_argument(
        "--max-message-mb",
        type=float,
        default=None,
        help=f"largest gRPC message either way (default {_G.max_message_bytes / 2**20:g})",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help=f"sequences in the engine's running batch (default {_E.max_num_seqs})",
    )
    p.add_argument("--kv-cache-memory", default=None, help="KV cache budget, e.g. 512MiB (default: automatic)")
    p.add_argument(
        "--drain-grace-s",
        type=float,
        default=None,
        help=f"on SIGTERM: seconds open streams may finish (default {_G.drain_grace_s:g})",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster, with Ray's own RAY_AUTH_MODE/RAY_AUTH_TOKEN (default: start a private local "
        "Ray, on 127.0.0.1 only, with a fresh token)",
    )
    p.set_defaults(run=run)


def serve_settings(args):
    """The ServeConfig: the YAML file (or the defaults), then every flag that was given, validated together."""
    cfg = load_serve_config(args.config)
    try:
        return apply_overrides(
            cfg,
            model_path=args.model,
            model_name=args.model_name,
            workers=args.workers,
            placement=args.placement,
            expert_replicas=args.expert_replicas,
            routers=args.routers,
            vision_encoders=args.vision_encoders,
            host=args.host,
            port=args.port,
            http_port=args.http_port,
            device=args.device,
            dtype=args.dtype,
            max_num_seqs=args.max_num_seqs,
            kv_cache_memory=args.kv_cache_memory,
            ray_address=args.ray_address,
            metrics_port=args.metrics_port,
            metrics_enabled=True if args.metrics_port is not None else None,
            max_concurrent_streams=args.max_concurrent_streams,
            max_queued_requests=args.max_queued_requests,
            drain_grace_s=args.drain_grace_s,
            max_message_bytes=int(args.max_message_mb * 2**20) if args.max_message_mb else None,
        )
    except SettingError as e:
        if e.source == "command line":  # the flag the person typed is at fault: say so plainly
            raise UsageError(f"{e.key}: {e.problem}") from None
        raise


def run(args) -> int:
    _check(args)
    from deploy.server import Server  # ray, torch and grpc: loaded only when this command runs

    config = serve_settings(args)
    if args.config:
        setup_logging(config.logging.level, config.logging.format)
    server = Server(config)
    signals = _Signals()
    signals.install(serving=False)  # a signal now interrupts the start-up (Server.start cleans up)
    with results_only() as stdout:
        server.start()
        signals.install(serving=True)  # again: starting Ray may have replaced the SIGTERM handler
        try:
            if _wait_serving(server, signals.stop, timeout_s=60.0):
                print(
                    f"moecluster serving {server.model_name} on {config.gateway.host}:{server.port}",
                    file=stdout,
                    flush=True,
                )
            while not signals.stop.wait(0.5):  # a bare wait() would not let the handler run promptly
                pass
        finally:
            server.stop()
    return 0


class _Signals:
    """During start-up a SIGINT/SIGTERM interrupts at once; once serving, the first one stops (drains) and a
    second one interrupts what is left of the drain."""

    def __init__(self):
        self.stop = threading.Event()
        self.serving = False

    def install(self, serving: bool) -> None:
        self.serving = serving
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.stop.is_set() or not self.serving:
            raise KeyboardInterrupt
        self.stop.set()


def _wait_serving(server, stop: threading.Event, timeout_s: float) -> bool:
    """True once readiness is SERVING; False if asked to stop first."""
    deadline = time.monotonic() + timeout_s
    while not server.gateway.health.ready:
        if stop.is_set():
            return False
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the cluster did not become ready within {timeout_s:.0f}s: {server.gateway.health.reason}"
            )
        time.sleep(0.1)
    return True


def _check(args) -> None:
    """What the config cannot check: that the files named exist, and a float flag's unit. Every other flag is
    validated with the config, naming the flag."""
    if args.max_message_mb is not None and args.max_message_mb <= 0:
        raise UsageError(f"--max-message-mb: expected a size > 0, got {args.max_message_mb}")
    if args.model is not None and not os.path.isdir(args.model):
        raise UsageError(f"--model: {args.model} is not a directory")
    if args.config is not None and not os.path.isfile(args.config):
        raise UsageError(f"--config: {args.config} is not a file")
