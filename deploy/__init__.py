"""How the cluster is brought up: the launcher (deployment.py), the serving process (server.py), the serve config,
the Ray job entrypoint, the CLI (cli/), benchmarks (bench/), the tiny models (tiny/), configs and manifests."""

import os

# gRPC reads this once, when it is first imported (by any deploy module): Ray forks helper processes, and gRPC's
# fork handlers would only print warnings about it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
