"""Brings up a cluster on Ray: one router actor and N expert worker actors in a placement group, joined in one
torch.distributed process group; tears it all down again.

Everything that can be checked before an actor starts is checked first (placement, worker count, GPUs), with a
message that says what to change. `--workers 0` never comes here: the experts then run in-process.
"""

from __future__ import annotations

import logging
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
from deploy.load_display import load_with_progress
from router.engine import EngineConfig
from router.messages import EngineRequest
from router.router_actor import RouterActor
from workers.expert_worker import ExpertWorker

log = logging.getLogger(__name__)


class ClusterStartError(RuntimeError):
    """The cluster cannot start as asked; the message says what to change."""


@dataclass
class ClusterSpec:
    model_dir: str
    workers: int
    device: str = "cpu"  # "cpu" or "cuda": one GPU per actor
    dtype: str = "auto"
    placement: str | None = None  # "0-5;6-10;11-15" or None for an even split
    collective_timeout_s: float = 60.0
    startup_timeout_s: float = 300.0
    ray_address: str | None = None  # None: start a local Ray for this cluster
    engine: EngineConfig = field(default_factory=EngineConfig)
    model_name: str | None = None  # served model name (default: the checkpoint directory's name)
    show_progress: bool = True  # weight-loading progress on stderr


@dataclass
class Cluster:
    spec: ClusterSpec
    router: object
    workers: list
    pg: object
    owns_ray: bool
    placement: ExpertPlacement | None
    _stopped: bool = field(default=False)

    @classmethod
    def start(cls, spec: ClusterSpec) -> "Cluster":
        cfg = load_model_config(spec.model_dir)
        placement = make_placement(spec, cfg)
        owns_ray = not ray.is_initialized()
        if owns_ray:
            _init_ray(spec)
        try:
            _check_gpus(spec)
            return cls._launch(spec, placement, owns_ray)
        except BaseException:
            if owns_ray:
                ray.shutdown()
            raise

    @classmethod
    def _launch(cls, spec: ClusterSpec, placement: ExpertPlacement, owns_ray: bool) -> "Cluster":
        layout = RankLayout(1, spec.workers)
        gpu = 1 if spec.device.startswith("cuda") else 0
        pg = placement_group([{"CPU": 1, "GPU": gpu} if gpu else {"CPU": 1}] * layout.world_size, strategy="PACK")
        ready, _ = ray.wait([pg.ready()], timeout=spec.startup_timeout_s)
        if not ready:
            remove_placement_group(pg)
            raise ClusterStartError(f"Ray could not place 1 router + {spec.workers} workers within "
                                    f"{spec.startup_timeout_s:.0f}s; free resources or lower --workers")

        def opts(bundle: int, concurrency: int):
            # workers: the loop plus health/stats calls; the router is async: one call per open stream
            return dict(num_cpus=1, num_gpus=gpu, max_concurrency=concurrency, max_restarts=0,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle))

        workers = [ray.remote(ExpertWorker).options(**opts(w + 1, 4)).remote(
            spec.model_dir, w, layout, placement, spec.device, spec.dtype) for w in range(spec.workers)]
        router = ray.remote(RouterActor).options(**opts(0, 10_000)).remote(
            spec.model_dir, layout, placement, spec.device, spec.dtype, spec.collective_timeout_s, spec.engine, spec.model_name)
        cluster = cls(spec, router, workers, pg, owns_ray, placement)
        try:
            load_with_progress([router, *workers], spec.startup_timeout_s, show=spec.show_progress)
            if workers:
                address = _get(router.open_rendezvous.remote(), spec.startup_timeout_s, "router start-up")
                _get([router.join.remote()] + [w.join.remote(address) for w in workers], spec.startup_timeout_s,
                     "process group rendezvous")
                _get(router.start_workers.remote(workers), spec.startup_timeout_s, "worker loops")
            else:
                _get(router.health.remote(), spec.startup_timeout_s, "router start-up")
        except BaseException:
            cluster.stop()
            raise
        log.info("cluster up: 1 router + %d workers on %s", spec.workers, spec.device)
        return cluster

    def generate(self, prompt_ids: list[int], params, timeout_s: float | None = None) -> dict:
        request = EngineRequest(uuid.uuid4().hex, params, prompt_ids=tuple(prompt_ids))
        return ray.get(self.router.generate.remote(request), timeout=timeout_s)

    def generate_batch(self, requests: list[EngineRequest], timeout_s: float | None = None) -> list[dict]:
        return ray.get(self.router.generate_batch.remote(requests), timeout=timeout_s)

    def stats(self) -> dict:
        return {"router": ray.get(self.router.stats.remote(), timeout=30),
                "workers": ray.get([w.stats.remote() for w in self.workers], timeout=30)}

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
            ray.shutdown()
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
            ray.shutdown()

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

    def __enter__(self) -> "Cluster":
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


def make_placement(spec: ClusterSpec, cfg) -> ExpertPlacement | None:
    """None for `workers == 0`: the router actor then runs the experts itself."""
    if spec.workers < 0:
        raise PlacementError(f"--workers must be >= 0 (got {spec.workers}); 0 runs the experts in the router")
    if spec.workers == 0:
        if spec.placement:
            raise PlacementError("--placement needs --workers >= 1; with 0 workers the router holds every expert")
        return None
    if spec.placement:
        placement = ExpertPlacement.from_spec(spec.placement, cfg.num_local_experts, cfg.moe_layers)
        if placement.num_workers != spec.workers:
            raise PlacementError(f"--placement names {placement.num_workers} workers but --workers is {spec.workers}")
        return placement
    return ExpertPlacement.even(cfg.num_local_experts, cfg.moe_layers, spec.workers)


def _init_ray(spec: ClusterSpec) -> None:
    if spec.ray_address:
        ray.init(address=spec.ray_address, log_to_driver=False)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance; nothing else can reach it
    ray.init(num_cpus=max(os.cpu_count() or 1, spec.workers + 2), include_dashboard=False,
             log_to_driver=False, configure_logging=False)


def _check_gpus(spec: ClusterSpec) -> None:
    if not spec.device.startswith("cuda"):
        return
    need, have = spec.workers + 1, int(ray.cluster_resources().get("GPU", 0))
    if have < need:
        raise ClusterStartError(f"--device cuda needs one GPU per actor: 1 router + {spec.workers} workers = {need} "
                                f"GPUs, but the Ray cluster has {have}; lower --workers to {max(have - 1, 0)} "
                                "(0 runs the experts on the router's GPU) or add GPU nodes")


def _get(refs, timeout_s: float, what: str):
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ClusterStartError(f"{what} did not finish within {timeout_s:.0f}s") from None
