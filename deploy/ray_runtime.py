"""The Ray side of a deployment: starting (or joining) Ray, the placement-group bundles the actors ask for, the
up-front check that they can ever fit, and whether a private local Ray's daemons are still alive."""

from __future__ import annotations

import json
import math
import os

import ray
from ray._private import ray_constants
from ray.autoscaler.v2.utils import is_autoscaler_v2
from ray.experimental import internal_kv

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
    """Bundle r is router r's, bundle routers + w worker slot w's, bundle routers + workers + e vision encoder e's
    (a replacement reuses its place's bundle)."""
    return (
        [c.router_resources.bundle(c.device)] * c.routers
        + [c.worker_resources.bundle(c.device)] * c.workers
        + [c.vision_encoder_resources.bundle(c.device)] * c.encoders
    )


def check_fits(c: ClusterConfig) -> str | None:
    """Whether the Ray cluster can ever hold the actors as asked. None: it can. When it cannot and an autoscaler
    could add nodes, what is pending (to report while waiting); without one, ClusterStartError saying what to
    change, at once, instead of waiting for the start-up timeout."""
    problem = fit_problem(c, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    if problem is None:
        return None
    if autoscaler_present():
        return f"waiting for the autoscaler to add nodes: {problem}"
    raise ClusterStartError(problem)


def fit_problem(c: ClusterConfig, nodes: list[dict[str, float]]) -> str | None:
    """What keeps these bundles off these nodes (each node's total resources), or None."""
    wanted = bundles(c)
    actors = f"{c.routers} router(s) + {c.workers} workers" + (f" + {c.encoders} vision encoders" if c.encoders else "")
    for resource in sorted({r for b in wanted for r in b}):
        need = sum(b.get(resource, 0) for b in wanted)
        have = sum(n.get(resource, 0) for n in nodes)
        largest = max((b.get(resource, 0) for b in wanted), default=0)
        fits_one = max((n.get(resource, 0) for n in nodes), default=0)
        if need > have or largest > fits_one:
            short = f"need {need:g} {resource} in all" + (f" and {largest:g} on one node" if largest > fits_one else "")
            where = f"the Ray cluster has {have:g} (at most {fits_one:g} on a node)"
            return f"{actors} {short}, but {where}; {_hint(resource, c, have)}"
    return None


def _hint(resource: str, c: ClusterConfig, have: float) -> str:
    if resource == "GPU":
        return (
            f"lower cluster.workers to {max(int(have) - c.routers, 0)} (0 runs the experts on the routers' GPUs) "
            "or add GPU nodes"
        )
    if resource == "CPU":
        return (
            "lower cluster.router_resources.num_cpus / cluster.worker_resources.num_cpus (fractions are fine) or "
            "cluster.workers, or add nodes"
        )
    if resource == "memory":
        return "lower cluster.*_resources.memory, or add nodes"
    return f"start nodes that offer it (ray start --resources '{{\"{resource}\": N}}'), or drop it from the config"


def autoscaler_present() -> bool:
    """An autoscaler that can add nodes watches this cluster (KubeRay's in-tree autoscaling, `ray up`): Ray v2's
    flag, or the v1 monitor's status naming node types of its own. Every `ray start --head` runs a read-only
    monitor too, which can add nothing; its node types are just the existing nodes ("node_<id>")."""
    try:
        if is_autoscaler_v2(fetch_from_server=True):
            return True
        raw = internal_kv._internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        if raw is None:
            return False
        mapping = json.loads(raw)["autoscaler_report"].get("node_type_mapping") or {}
        return any(node_type != f"node_{node}" for node, node_type in mapping.items())
    except Exception:  # noqa: BLE001 - private APIs: without an answer, assume none (and fail fast)
        return False


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
