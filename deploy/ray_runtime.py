"""The Ray side of a deployment: starting (or joining) Ray, the placement-group bundles the actors ask for, the
up-front check that they can ever fit, and whether a private local Ray's daemons are still alive."""

from __future__ import annotations

import math
import os

import ray

from deploy import private_ray
from deploy.cluster_config import ClusterConfig
from deploy.errors import ClusterStartError


def init_ray(c: ClusterConfig) -> bool:
    """Join `c.ray_address`, or start a private local Ray; True when this process started it (and must stop it)."""
    if ray.is_initialized():
        return False
    if c.ray_address:
        ray.init(address=c.ray_address, log_to_driver=False)
        return False
    cpus = sum(b["CPU"] for b in bundles(c))
    private_ray.start(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus) + 1))  # loopback only, token auth
    return True


def bundles(c: ClusterConfig) -> list[dict[str, float]]:
    """Bundle r is router r's, bundle routers + w worker slot w's (a replacement reuses its place's bundle)."""
    return [c.router_resources.bundle(c.device)] * c.routers + [c.worker_resources.bundle(c.device)] * c.workers


def check_fits(c: ClusterConfig) -> None:
    """Fail at once, saying what to change, when the Ray cluster can never hold the actors as asked."""
    wanted = bundles(c)
    total = ray.cluster_resources()
    for resource in sorted({r for b in wanted for r in b}):
        need, have = sum(b.get(resource, 0) for b in wanted), total.get(resource, 0)
        if need > have:
            hint = {
                "GPU": f"lower cluster.workers to {max(int(have) - 1, 0)} (0 runs the experts on the router's "
                "GPU) or add GPU nodes",
                "CPU": "lower cluster.router_resources.num_cpus / cluster.worker_resources.num_cpus (fractions "
                "are fine) or cluster.workers, or add nodes",
            }.get(resource, "add nodes or ask for less")
            raise ClusterStartError(
                f"{c.routers} router(s) + {c.workers} workers need {need:g} {resource} in all, but the Ray "
                f"cluster has {have:g}; {hint}"
            )


def local_ray_alive() -> bool:
    """False when this process started Ray and its raylet or GCS has exited (True when Ray runs elsewhere)."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return True
    try:
        pids = [info.process.pid for kind in ("raylet", "gcs_server") for info in node.all_processes.get(kind, [])]
    except Exception:  # noqa: BLE001 - private API: assume alive, the bounded path handles the rest
        return True
    return all(_running(pid) for pid in pids)


def _running(pid: int) -> bool:
    """Alive and not a zombie (Popen.poll() misses daemons that Ray's own reaper collected)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
