"""Entrypoint for Ray jobs: joins the Ray cluster it was submitted to instead of starting one, serves, and stops
cleanly when the job is stopped (SIGTERM from `ray job stop`: drain briefly, remove its actors).

    ray job submit --working-dir . -- python -m deploy.ray_job --config deploy/configs/tiny-cpu.yaml

Flags override the file, as for `moecluster serve`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from cluster.settings import SettingError
from deploy.config import apply_overrides, load_serve_config
from deploy.logging_setup import setup_logging
from deploy.server import Server

log = logging.getLogger("moecluster.job")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")  # never start a hidden local Ray: join the job's
    p = argparse.ArgumentParser(prog="python -m deploy.ray_job", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML serve configuration (default: the tiny CPU setup)")
    p.add_argument("--model", dest="model_path", default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument(
        "--drain-grace-s",
        type=float,
        default=2.0,
        help="on SIGTERM: seconds open streams may finish (ray job stop kills after a few seconds)",
    )
    args = p.parse_args(argv)
    try:
        cfg = apply_overrides(
            load_serve_config(args.config),
            model_path=args.model_path,
            workers=args.workers,
            port=args.port,
            http_port=args.http_port,
        )
    except SettingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.logging.level, cfg.logging.format)
    if cfg.cluster.ray_address is None:  # a job always joins the cluster that runs it
        cfg = apply_overrides(cfg, ray_address=os.environ.get("RAY_ADDRESS", "auto"))
    return serve_until_stopped(cfg, args.drain_grace_s)


def serve_until_stopped(cfg, drain_grace_s: float) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = Server(cfg)
    try:
        server.start()
        print(f"moecluster serving {server.model_name} on {server.target}", flush=True)
        while not stop.wait(0.5):
            pass
        log.info("stop requested: draining for %.1fs", drain_grace_s)
    finally:
        server.stop(drain=True, grace_s=drain_grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
