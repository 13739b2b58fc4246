"""A deployment on Ray: M router actors, N expert worker actors and V vision encoder actors in a placement group
(bundle r router r's, bundle M + w worker slot w's, bundle M + N + e encoder e's), the routers' channels to the
workers, the encoders handed to every router, and the supervisor that replaces dead actors and rebalances;
brought up by `Deployment.start`, torn down by `stop`.

Everything that can be checked before an actor starts is checked first (placement, replicas, memory, resources),
with a message that names the setting to change. `workers: 0` runs every expert inside the router.

Without `cluster.ray_address` it starts a private Ray (deploy/private_ray.py: loopback only, token authentication);
with one it joins that cluster as Ray's own settings say (RAY_AUTH_MODE, RAY_AUTH_TOKEN, ...).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actor_reports import RouterHealth, RouterStats, SupervisorStatus, WorkerStats
from cluster.actor_state import ActorKind
from cluster.checkpoint import CheckpointReader
from cluster.config import ModelConfig, load_model_config, read_config_json
from cluster.errors import RebalanceRefused
from cluster.expert_map import ExpertMap, PlacementError
from cluster.vision.weights import has_vision_tower
from cluster.weights import experts_bytes
from deploy import private_ray
from deploy.actor_specs import encoder_spec, router_spec, supervisor_settings, worker_spec
from deploy.cluster_config import ClusterConfig
from deploy.errors import ClusterStartError
from deploy.load_display import load_with_progress
from deploy.plan import check_plan, serve_plan
from deploy.ray_runtime import bundles, check_fits, fit_problem, init_ray, local_ray_alive
from deploy.supervisor import Supervisor
from router.encoder.actor import VisionEncoderActor
from router.engine.config import EngineConfig
from router.request.messages import EngineRequest
from router.router_actor import RouterActor
from workers.expert_worker import ExpertWorker

log = logging.getLogger(__name__)
PLACEMENT_REPORT_S = 2.0  # while the placement group is pending, say so this often


@dataclass(frozen=True)
class DeploymentStats:
    """Deployment.stats(): router 0's and every worker's stats, in slot order."""

    router: RouterStats
    workers: tuple[WorkerStats, ...] = ()


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
    replacement_load_delay_s: float = 0.0  # fault-injection tests: replacements load this much slower
    log: tuple[str, str] = ("INFO", "text")  # the actors' logging level and format
    expert_dtype: str = "auto"  # how routed experts are held: auto (as stored), fp8, model (cluster/weights.py)

    @classmethod
    def from_serve(cls, cfg, model_dir: str, show_progress: bool = True) -> DeploymentSpec:
        return cls(
            model_dir,
            cfg.cluster,
            cfg.scheduler,
            cfg.model.dtype,
            cfg.model.served_name,
            show_progress,
            log=(cfg.logging.level, cfg.logging.format),
            expert_dtype=cfg.model.expert_dtype,
        )


@dataclass
class Deployment:
    spec: DeploymentSpec
    pg: object
    owns_ray: bool
    expert_map: ExpertMap | None
    bind_host: str | None = None  # 127.0.0.1 for a private Ray; None: each node's own IP
    supervisor: Supervisor | None = None
    _initial: list = field(default_factory=list)  # every actor started, until the supervisor tracks them
    _stopped: bool = False
    _next_router: int = 0

    @classmethod
    def start(cls, spec: DeploymentSpec, on_status: Callable[[str], None] = lambda message: None) -> Deployment:
        """Bring it up; `on_status(message)` hears what the start-up is waiting for (the serve process shows it as
        its readiness reason)."""
        cfg = load_model_config(spec.model_dir)
        raw, source = read_config_json(spec.model_dir)
        plan = serve_plan(spec, raw, source)
        if plan is not None:
            check_plan(plan)  # before any weight is read or any actor placed
        reader = CheckpointReader(spec.model_dir)
        spec = dataclasses.replace(spec, cluster=spec.cluster.with_vision(has_vision_tower(reader)))
        expert_map = spec.cluster.expert_map(cfg)
        if expert_map is not None:
            check_memory(spec.cluster, cfg, expert_map, reader)
        owns_ray = init_ray(spec.cluster)
        try:
            pending = check_fits(spec.cluster)
            if pending:
                log.warning("%s", pending)
                on_status(pending)
            return cls._launch(spec, expert_map, owns_ray, on_status)
        except BaseException:
            if owns_ray:
                private_ray.shutdown()
            raise

    @classmethod
    def _launch(cls, spec: DeploymentSpec, expert_map: ExpertMap | None, owns_ray: bool, on_status) -> Deployment:
        c = spec.cluster
        pg = placement_group(bundles(c), strategy="PACK")
        if not _wait_placed(pg, c, on_status):
            remove_placement_group(pg)
            raise ClusterStartError(
                f"Ray could not place {c.routers} router(s) + {c.workers} workers ({bundles(c)[0]} and "
                f"{c.workers} x {bundles(c)[-1]}) within {c.startup_timeout_s:.0f}s (cluster.startup_timeout_s); "
                "free resources or lower cluster.routers / cluster.workers"
            )
        deployment = cls(spec, pg, owns_ray, expert_map, "127.0.0.1" if owns_ray else None)
        routers = {r: deployment._spawn(ActorKind.ROUTER, r, expert_map) for r in range(c.routers)}
        workers = {w: deployment._spawn(ActorKind.WORKER, w, expert_map) for w in range(c.workers)}
        encoders = {e: deployment._spawn(ActorKind.ENCODER, e, expert_map) for e in range(c.encoders)}
        deployment._initial = [*routers.values(), *workers.values(), *encoders.values()]
        try:
            on_status("loading the weights")
            load_with_progress(deployment._initial, c.startup_timeout_s, show=spec.show_progress)
            if encoders:
                _get(
                    [r.use_vision_encoders.remote(encoders) for r in routers.values()],
                    c.startup_timeout_s,
                    "handing the vision encoders to the routers",
                )
            if workers:
                on_status("forming the routers' groups with the expert workers")
                _get(
                    [r.connect.remote(workers) for r in routers.values()],
                    c.startup_timeout_s,
                    "process group rendezvous",
                )
            deployment.supervisor = Supervisor(
                routers, workers, expert_map, encoders, deployment._spawn_replacement, **supervisor_settings(c)
            )
            deployment.supervisor.start()
        except BaseException:
            deployment.stop()
            raise
        log.info(
            "cluster up: %d router(s) + %d workers + %d vision encoders on %s",
            c.routers,
            c.workers,
            c.encoders,
            c.device,
        )
        return deployment

    def _spawn(self, kind: ActorKind, index: int, expert_map: ExpertMap | None, load_delay_s: float = 0.0):
        """A router (bundle r), a worker (bundle routers + slot) or a vision encoder (bundle routers + workers +
        index) actor, not yet loaded."""
        if kind is ActorKind.ENCODER:
            actor, cls = encoder_spec(self.spec, index), VisionEncoderActor
        elif kind is ActorKind.ROUTER:
            actor, cls = router_spec(self.spec, index, expert_map, self.bind_host), self.spec.router_class
        else:
            actor, cls = worker_spec(self.spec, index, expert_map, self.bind_host, load_delay_s), ExpertWorker
        strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=actor.bundle)
        options = dict(
            **actor.resources, max_concurrency=actor.concurrency, max_restarts=0, scheduling_strategy=strategy
        )
        return ray.remote(cls).options(**options).remote(**actor.kwargs)

    def _spawn_replacement(self, kind: ActorKind, index: int, expert_map: ExpertMap | None):
        delay_s = self.spec.replacement_load_delay_s if kind is ActorKind.WORKER else 0.0
        return self._spawn(kind, index, expert_map, delay_s)

    @property
    def routers(self) -> list:
        """The current actor of every router, by id (the gateway spreads requests over the ready ones)."""
        return self.supervisor.routers if self.supervisor else self._initial[: self.spec.cluster.routers]

    @property
    def router(self):
        """Router 0 (for single-router callers: parity checks, benchmarks)."""
        return self.routers[0]

    @property
    def workers(self) -> list:
        """The current actor of every worker slot."""
        return self.supervisor.workers if self.supervisor else []

    @property
    def encoders(self) -> list:
        """The current actor of every vision encoder."""
        return self.supervisor.encoders if self.supervisor else []

    def generate(self, prompt_ids: list[int], params, timeout_s: float | None = None) -> dict:
        request = EngineRequest(uuid.uuid4().hex, params, prompt_ids=tuple(prompt_ids))
        return ray.get(self.router.generate.remote(request), timeout=timeout_s)

    def generate_batch(self, requests: list[EngineRequest], timeout_s: float | None = None) -> list[dict]:
        """Every request at once, spread over the routers (request i on router i mod M); results in order."""
        routers = self.routers
        shares = [requests[r :: len(routers)] for r in range(len(routers))]
        refs = [router.generate_batch.remote(share) for router, share in zip(routers, shares) if share]
        results = ray.get(refs, timeout=timeout_s)
        out: list[dict] = [{}] * len(requests)
        for r, share_results in enumerate(results):
            out[r :: len(routers)] = share_results
        return out

    def stats(self) -> DeploymentStats:
        return DeploymentStats(
            router=ray.get(self.router.stats.remote(), timeout=30),
            workers=tuple(ray.get([w.stats.remote() for w in self.workers], timeout=30)),
        )

    def supervision(self) -> SupervisorStatus | None:
        """The supervisor's status (None without workers)."""
        return self.supervisor.status() if self.supervisor else None

    def rebalance(self):
        """Rebalance the expert map now (see Supervisor.rebalance)."""
        if self.supervisor is None:
            raise RebalanceRefused("the router holds every expert (workers: 0): there is nothing to rebalance")
        return self.supervisor.rebalance()

    def health(self, timeout_s: float = 10.0) -> RouterHealth:
        return ray.get(self.router.health.remote(), timeout=timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the supervisor, the loops and the actors, release the placement group (and the local Ray, if this
        started it). Bounded: with the raylet already gone, removing the placement group would never return."""
        if self._stopped:
            return
        self._stopped = True
        if self.supervisor is not None:
            self.supervisor.stop()
        if not local_ray_alive():  # a group signal (Ctrl-C, systemd, timeout) already took the raylet down
            log.warning("the local Ray's daemons are gone; shutting Ray down without releasing actors one by one")
            private_ray.shutdown()
            return
        stopper = threading.Thread(target=self._release, name="cluster-stop", daemon=True)
        stopper.start()
        deadline = time.monotonic() + timeout_s
        while stopper.is_alive() and time.monotonic() < deadline:
            stopper.join(0.2)
            if not local_ray_alive():  # the daemons died meanwhile: Ray calls would only hang now
                log.warning("the local Ray's daemons exited while stopping; shutting Ray down")
                break
        else:
            if stopper.is_alive():
                log.error("the cluster did not stop within %.0fs; disconnecting", timeout_s)
        if self.owns_ray:
            private_ray.shutdown()

    def _release(self) -> None:
        try:
            ray.get([r.shutdown.remote() for r in self.routers], timeout=15)
        except Exception as e:  # noqa: BLE001 - the actors are killed below regardless
            log.info("router shutdown: %s", e)
        actors = [*self.routers, *self.workers, *self.encoders] if self.supervisor else self._initial
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as e:  # noqa: BLE001
                log.info("kill: %s", e)
        remove_placement_group(self.pg)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def check_memory(cluster: ClusterConfig, cfg: ModelConfig, expert_map: ExpertMap, reader: CheckpointReader) -> None:
    """Before any weight is read: each slot's experts must fit what its actor may use (cluster.worker_resources.
    memory, when set; the GPU's free memory is checked by the worker itself, also before reading)."""
    limit = cluster.worker_resources.memory
    if not limit:
        return
    for slot in range(expert_map.num_workers):
        need = experts_bytes(cfg, reader, expert_map.slot_experts(slot))
        if need > limit:
            raise PlacementError(
                f"cluster.expert_replicas / cluster.placement: worker slot {slot} would hold {need / 2**30:.2f} GiB "
                f"of experts, more than cluster.worker_resources.memory ({limit / 2**30:.2f} GiB); use fewer "
                "replicas or more workers, or raise the memory"
            )


def _wait_placed(pg, c: ClusterConfig, on_status) -> bool:
    """Wait (up to the start-up timeout) for Ray to place the bundles, saying what is pending meanwhile."""
    deadline = time.monotonic() + c.startup_timeout_s
    while time.monotonic() < deadline:
        ready, _ = ray.wait([pg.ready()], timeout=min(PLACEMENT_REPORT_S, deadline - time.monotonic()))
        if ready:
            return True
        problem = fit_problem(c, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
        message = f"the placement group is pending: {problem or 'Ray is placing the actors'}"
        log.warning("%s (%.0fs left of cluster.startup_timeout_s)", message, deadline - time.monotonic())
        on_status(message)
    return False


def _get(refs, timeout_s: float, what: str):
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ClusterStartError(f"{what} did not finish within {timeout_s:.0f}s") from None
