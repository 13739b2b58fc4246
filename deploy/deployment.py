"""A deployment on Ray: one router actor and N expert worker actors in a placement group, joined in one
torch.distributed process group; brought up by `Deployment.start`, torn down by `stop`.

Everything that can be checked before an actor starts is checked first (placement, worker count, GPUs), with a
message that says what to change. `--workers 0` never comes here: the experts then run in-process.

Without `cluster.ray_address` it starts a private Ray (deploy/private_ray.py: loopback only, token authentication);
with one it joins that cluster as Ray's own settings say (RAY_AUTH_MODE, RAY_AUTH_TOKEN, ...).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import load_model_config
from cluster.placement import ExpertPlacement, PlacementError
from cluster.process_group import RankLayout
from deploy import private_ray
from deploy.cluster_config import ClusterConfig
from deploy.errors import ClusterStartError
from deploy.load_display import load_with_progress
from router.engine_config import EngineConfig
from router.messages import EngineRequest
from router.router_actor import RouterActor
from workers.expert_worker import ExpertWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeploymentSpec:
    """What to bring up; built from a ServeConfig (`from_serve`) or by the CLI and benchmarks directly."""

    model_dir: str
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    dtype: str = "auto"
    model_name: str | None = None  # served model name; None: the checkpoint directory's name
    show_progress: bool = True  # weight-loading progress on stderr
    router_class: type = RouterActor  # benchmarks substitute a subclass with a timing call

    @classmethod
    def from_serve(cls, cfg, model_dir: str, show_progress: bool = True) -> DeploymentSpec:
        return cls(model_dir, cfg.cluster, cfg.scheduler, cfg.model.dtype, cfg.model.served_name, show_progress)


@dataclass
class Deployment:
    spec: DeploymentSpec
    router: object
    workers: list
    pg: object
    owns_ray: bool
    placement: ExpertPlacement | None
    _stopped: bool = field(default=False)

    @classmethod
    def start(cls, spec: DeploymentSpec) -> Deployment:
        cfg = load_model_config(spec.model_dir)
        placement = make_placement(spec.cluster, cfg)
        owns_ray = not ray.is_initialized()
        if owns_ray:
            _init_ray(spec.cluster)
        try:
            _check_fits(spec.cluster)
            return cls._launch(spec, placement, owns_ray)
        except BaseException:
            if owns_ray:
                private_ray.shutdown()
            raise

    @classmethod
    def _launch(cls, spec: DeploymentSpec, placement: ExpertPlacement, owns_ray: bool) -> Deployment:
        c = spec.cluster
        layout = RankLayout(1, c.workers)
        bundles = _bundles(c)
        pg = placement_group(bundles, strategy="PACK")
        ready, _ = ray.wait([pg.ready()], timeout=c.startup_timeout_s)
        if not ready:
            remove_placement_group(pg)
            raise ClusterStartError(
                f"Ray could not place 1 router + {c.workers} workers ({bundles[0]} and "
                f"{c.workers} x {bundles[-1]}) within {c.startup_timeout_s:.0f}s "
                "(cluster.startup_timeout_s); free resources or lower cluster.workers"
            )

        def opts(bundle: int, concurrency: int):
            # workers: the loop plus health/stats calls; the router is async: one call per open stream
            res = bundles[bundle]
            return dict(
                num_cpus=res["CPU"],
                num_gpus=res.get("GPU", 0),
                memory=res.get("memory"),
                max_concurrency=concurrency,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle),
            )

        workers = [
            ray.remote(ExpertWorker)
            .options(**opts(w + 1, 4))
            .remote(spec.model_dir, w, layout, placement, c.device, spec.dtype)
            for w in range(c.workers)
        ]
        router = (
            ray.remote(spec.router_class)
            .options(**opts(0, 10_000))
            .remote(
                spec.model_dir,
                layout,
                placement,
                c.device,
                spec.dtype,
                c.collective_timeout_s,
                spec.engine,
                spec.model_name,
            )
        )
        deployment = cls(spec, router, workers, pg, owns_ray, placement)
        try:
            load_with_progress([router, *workers], c.startup_timeout_s, show=spec.show_progress)
            if workers:
                address = _get(router.open_rendezvous.remote(), c.startup_timeout_s, "router start-up")
                _get(
                    [router.join.remote()] + [w.join.remote(address) for w in workers],
                    c.startup_timeout_s,
                    "process group rendezvous",
                )
                _get(router.start_workers.remote(workers), c.startup_timeout_s, "worker loops")
            else:
                _get(router.health.remote(), c.startup_timeout_s, "router start-up")
        except BaseException:
            deployment.stop()
            raise
        log.info("cluster up: 1 router + %d workers on %s", c.workers, c.device)
        return deployment

    def generate(self, prompt_ids: list[int], params, timeout_s: float | None = None) -> dict:
        request = EngineRequest(uuid.uuid4().hex, params, prompt_ids=tuple(prompt_ids))
        return ray.get(self.router.generate.remote(request), timeout=timeout_s)

    def generate_batch(self, requests: list[EngineRequest], timeout_s: float | None = None) -> list[dict]:
        return ray.get(self.router.generate_batch.remote(requests), timeout=timeout_s)

    def stats(self) -> dict:
        return {
            "router": ray.get(self.router.stats.remote(), timeout=30),
            "workers": ray.get([w.stats.remote() for w in self.workers], timeout=30),
        }

    def health(self, timeout_s: float = 10.0) -> dict:
        return ray.get(self.router.health.remote(), timeout=timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop loops, kill actors, release the placement group (and the local Ray, if this started it).
        Bounded: with the raylet already gone, removing the placement group would never return."""
        if self._stopped:
            return
        self._stopped = True
        if not _local_ray_alive():  # a group signal (Ctrl-C, systemd, timeout) already took the raylet down
            log.warning("the local Ray's daemons are gone; shutting Ray down without releasing actors one by one")
            private_ray.shutdown()
            return
        stopper = threading.Thread(target=self._release, name="cluster-stop", daemon=True)
        stopper.start()
        deadline = time.monotonic() + timeout_s
        while stopper.is_alive() and time.monotonic() < deadline:
            stopper.join(0.2)
            if not _local_ray_alive():  # the daemons died meanwhile: Ray calls would only hang now
                log.warning("the local Ray's daemons exited while stopping; shutting Ray down")
                break
        else:
            if stopper.is_alive():
                log.error("the cluster did not stop within %.0fs; disconnecting", timeout_s)
        if self.owns_ray:
            private_ray.shutdown()

    def _release(self) -> None:
        try:
            ray.get(self.router.shutdown.remote(), timeout=15)
        except Exception as e:  # noqa: BLE001 - the actors are killed below regardless
            log.info("router shutdown: %s", e)
        for actor in [self.router, *self.workers]:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as e:  # noqa: BLE001
                log.info("kill: %s", e)
        remove_placement_group(self.pg)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _local_ray_alive() -> bool:
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


def make_placement(cluster: ClusterConfig, cfg) -> ExpertPlacement | None:
    """None for `workers == 0`: the router actor then runs the experts itself."""
    if cluster.workers == 0:
        return None
    if cluster.placement:
        placement = ExpertPlacement.from_spec(cluster.placement, cfg.num_local_experts, cfg.moe_layers)
        if placement.num_workers != cluster.workers:
            raise PlacementError(
                f"--placement names {placement.num_workers} workers but --workers is {cluster.workers}"
            )
        return placement
    return ExpertPlacement.even(cfg.num_local_experts, cfg.moe_layers, cluster.workers)


def _bundles(c: ClusterConfig) -> list[dict[str, float]]:
    return [c.router_resources.bundle(c.device)] + [c.worker_resources.bundle(c.device)] * c.workers


def _init_ray(c: ClusterConfig) -> None:
    if c.ray_address:
        ray.init(address=c.ray_address, log_to_driver=False)
        return
    cpus = sum(b["CPU"] for b in _bundles(c))
    private_ray.start(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus) + 1))


def _check_fits(c: ClusterConfig) -> None:
    """Fail at once, saying what to change, when the Ray cluster can never hold the actors as asked."""
    bundles = _bundles(c)
    total = ray.cluster_resources()
    for resource in sorted({r for b in bundles for r in b}):
        need, have = sum(b.get(resource, 0) for b in bundles), total.get(resource, 0)
        if need > have:
            hint = {
                "GPU": f"lower cluster.workers to {max(int(have) - 1, 0)} (0 runs the experts on the router's "
                "GPU) or add GPU nodes",
                "CPU": "lower cluster.router_resources.num_cpus / cluster.worker_resources.num_cpus (fractions "
                "are fine) or cluster.workers, or add nodes",
            }.get(resource, "add nodes or ask for less")
            raise ClusterStartError(
                f"1 router + {c.workers} workers need {need:g} {resource} in all, but the Ray "
                f"cluster has {have:g}; {hint}"
            )


def _get(refs, timeout_s: float, what: str):
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ClusterStartError(f"{what} did not finish within {timeout_s:.0f}s") from None
