"""`moecluster serve`: the gRPC gateway, the router and the expert workers, in the foreground. Prints one line,
`moecluster serving <model> on HOST:PORT`, once readiness is SERVING; SIGTERM or SIGINT drains (readiness
NOT_SERVING, open streams finish within --drain-grace-s, the rest are aborted), then stops the cluster and the
Ray it started. A second signal skips what is left of the drain."""

from __future__ import annotations

import os
import signal
import threading
import time


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over gRPC (gateway + router + expert workers)")
    p.add_argument("--config", default=None, help="YAML serve configuration (deploy/configs/*.yaml); flags override it")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the tiny model, made once in "
                   "$MOECLUSTER_CACHE or $XDG_CACHE_HOME/moecluster or ~/.cache/moecluster)")
    p.add_argument("--model-name", default=None, help="served model name (default: the directory's name)")
    p.add_argument("--workers", type=int, default=None, help="expert workers (default 2; 0: the router holds every expert)")
    p.add_argument("--placement", default=None, help="experts per worker, e.g. '0-5;6-10;11-15' (default: even)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1 without --config; "
                   "0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=None, help="gRPC port (default 50051; 0: any free port, printed)")
    p.add_argument("--device", default=None, help="cpu or cuda (one GPU per actor)")
    p.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics port (default: none without --config; 0: any free port, logged)")
    p.add_argument("--max-concurrent-streams", type=int, default=None, help="open Generate streams; beyond: "
                   "RESOURCE_EXHAUSTED (default 256)")
    p.add_argument("--max-queued-requests", type=int, default=None, help="requests waiting in the engine; beyond: "
                   "RESOURCE_EXHAUSTED (default 1024; 0: no bound)")
    p.add_argument("--max-message-mb", type=float, default=None, help="largest gRPC message either way (default 4)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequences in the engine's running batch (default 64)")
    p.add_argument("--kv-cache-memory", default=None, help="KV cache budget, e.g. 512MiB (default: automatic)")
    p.add_argument("--drain-grace-s", type=float, default=None, help="on SIGTERM: seconds open streams may finish "
                   "(default 30)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a private local Ray)")
    p.set_defaults(run=run)


# Without --config: a private server on this machine (loopback only, no metrics port to collide with).
LOCAL_DEFAULTS = {"gateway": {"host": "127.0.0.1"}, "metrics": {"enabled": False}}


def serve_settings(args, env):
    """The ServerConfig: the YAML file (or the local defaults), then every flag that was given."""
    import dataclasses

    from deploy.config import apply_overrides, load_serve_config, parse_serve_config
    from deploy.serve_settings import server_config_from

    cfg = load_serve_config(args.config) if args.config else parse_serve_config(LOCAL_DEFAULTS, "built-in defaults")
    cfg = apply_overrides(cfg, model_path=args.model, model_name=args.model_name, workers=args.workers,
                          placement=args.placement, host=args.host, port=args.port, device=args.device,
                          dtype=args.dtype, metrics_port=args.metrics_port, max_num_seqs=args.max_num_seqs,
                          kv_cache_memory=args.kv_cache_memory, ray_address=args.ray_address)
    if args.metrics_port is not None:
        cfg = dataclasses.replace(cfg, metrics=dataclasses.replace(cfg.metrics, enabled=True))
    server = server_config_from(cfg, env)
    gateway_flags = {"max_concurrent_streams": args.max_concurrent_streams,
                     "max_queued_requests": args.max_queued_requests, "drain_grace_s": args.drain_grace_s,
                     "max_message_bytes": int(args.max_message_mb * 2**20) if args.max_message_mb else None}
    gateway = dataclasses.replace(server.gateway, **{k: v for k, v in gateway_flags.items() if v is not None})
    return dataclasses.replace(server, gateway=gateway), cfg


def run(args) -> int:
    from deploy.cli import UsageError

    _check(args, UsageError)
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # Ray forks helpers; gRPC's fork handlers only warn
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from deploy.logging_setup import setup_logging
    from deploy.server import Server

    config, settings = serve_settings(args, os.environ)
    if args.config:
        setup_logging(settings.logging.level, settings.logging.format)
    server = Server(config)
    signals = _Signals()
    signals.install(serving=False)  # a signal now interrupts the start-up (Server.start cleans up)
    server.start()
    signals.install(serving=True)  # again: starting Ray may have replaced the SIGTERM handler
    try:
        if _wait_serving(server, signals.stop, timeout_s=60.0):
            print(f"moecluster serving {server.model_name} on {config.gateway.host}:{server.port}", flush=True)
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
            raise RuntimeError(f"the cluster did not become ready within {timeout_s:.0f}s: "
                               f"{server.gateway.health.reason}")
        time.sleep(0.1)
    return True


def _check(args, UsageError) -> None:
    """Flags the YAML config does not cover; the rest are validated with the config (naming the flag)."""
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers: expected an integer >= 0, got {args.workers}")
    if args.port is not None and not 0 <= args.port < 65536:
        raise UsageError(f"--port: expected 0..65535 (0: any free port), got {args.port}")
    if args.metrics_port is not None and not 0 <= args.metrics_port < 65536:
        raise UsageError(f"--metrics-port: expected 0..65535 (0: any free port), got {args.metrics_port}")
    for flag, value in (("--max-concurrent-streams", args.max_concurrent_streams),
                        ("--max-num-seqs", args.max_num_seqs)):
        if value is not None and value < 1:
            raise UsageError(f"{flag}: expected an integer >= 1, got {value}")
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        raise UsageError(f"--max-queued-requests: expected an integer >= 0 (0: no bound), "
                         f"got {args.max_queued_requests}")
    if args.drain_grace_s is not None and args.drain_grace_s < 0:
        raise UsageError(f"--drain-grace-s: expected seconds >= 0, got {args.drain_grace_s}")
    if args.max_message_mb is not None and args.max_message_mb <= 0:
        raise UsageError(f"--max-message-mb: expected a size > 0, got {args.max_message_mb}")
    if args.device is not None and args.device != "cpu" and not args.device.startswith("cuda"):
        raise UsageError(f"--device: expected cpu or cuda, got {args.device!r}")
    if args.model is not None and not os.path.isdir(args.model):
        raise UsageError(f"--model: {args.model} is not a directory")
    if args.config is not None and not os.path.isfile(args.config):
        raise UsageError(f"--config: {args.config} is not a file")
