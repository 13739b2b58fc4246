"""`moecluster` command line. Every user error ends as one line `error: ...` on stderr and exit status 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cluster.errors import ClusterFailure, RebalanceRefused, error_summary
from deploy.cli import bench, client, demo, generate, serve, tiny_model
from deploy.errors import ClusterStartError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moecluster", description="Serve Llama 4 mixture-of-experts models.")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (demo, tiny_model, generate, bench, serve, client):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Never let a stray Ray call start a second, hidden local Ray (e.g. while shutting down): read at import.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # UsageError, SettingError, ConfigError, CheckpointError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ClusterStartError, ClusterFailure, RebalanceRefused, RuntimeError) as e:  # the cluster failed or could
        # not start (or a library said why it could not go on): say why, in one line
        print(f"error: {error_summary(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
