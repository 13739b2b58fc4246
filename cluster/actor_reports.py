"""What the actors report about themselves: a router's health and stats (its channel's, its images'), an expert
worker's and a vision encoder's stats, and the supervisor's status. Frozen dataclasses, built by the actor that
reports and read by field everywhere else (the gateway's status and metrics, the supervisor, the CLI, the
benchmarks, the tests); they pickle across Ray. Every field has a default, so a new field breaks no reader.

The states and kinds they carry are cluster/actor_state.py's enums.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from cluster.actor_state import ActorKind, ChannelState, MemberState
from cluster.expert_map import ExpertMap
from cluster.failover_buckets import STALL_BUCKETS_S, STALLS_KEPT


@dataclass(frozen=True)
class Pong:
    """An actor's answer to `ping()`: it is alive and not blocked, and which process it is."""

    kind: ActorKind = ActorKind.WORKER
    index: int = 0  # the worker slot, router id or encoder index
    pid: int = 0
    state: MemberState | None = None  # a worker's own state
    steps: int = 0  # a worker's steps served


@dataclass(frozen=True)
class ChannelStats:
    """A router's channel to its expert workers (router/experts/channel.py swaps in a new one on each change)."""

    epoch: int = 0
    members: tuple[int, ...] = ()  # the worker slots of the current epoch, in rank order
    state: ChannelState = ChannelState.STARTING
    failovers: int = 0
    replayed_steps: int = 0
    regroups: int = 0
    stalls_s: tuple[float, ...] = ()  # recovery time per failover, the latest STALLS_KEPT
    stall_buckets: tuple[int, ...] = (0,) * (len(STALL_BUCKETS_S) + 1)  # every failover, by STALL_BUCKETS_S
    stall_sum_s: float = 0.0
    last_event: str = ""
    map_generation: int = 0

    def with_stall(self, stall_s: float) -> ChannelStats:
        """One more failover that took `stall_s`."""
        bucket = sum(stall_s > bound for bound in STALL_BUCKETS_S)
        buckets = tuple(n + (i == bucket) for i, n in enumerate(self.stall_buckets))
        return replace(
            self,
            failovers=self.failovers + 1,
            stalls_s=(*self.stalls_s[-STALLS_KEPT + 1 :], stall_s),
            stall_buckets=buckets,
            stall_sum_s=self.stall_sum_s + stall_s,
        )


@dataclass(frozen=True)
class ImageStats:
    """A router's image features: encodes, the feature cache, the vision encoder actors it uses."""

    encodes: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_bytes: int = 0
    encoder_retries: int = 0
    live_encoders: tuple[int, ...] = ()


@dataclass(frozen=True)
class RouterHealth:
    """RouterActor.health(): ready while it takes requests (loaded, its channel serving or in a failover)."""

    ready: bool = False
    failure: str | None = None  # the engine's failure (its step raised, or the supervisor gave up)
    state: ChannelState = ChannelState.STARTING
    steps: int = 0
    pid: int = 0


@dataclass(frozen=True)
class RouterStats:
    """RouterActor.stats()."""

    router: int = 0
    device: str = ""
    dtype: str = ""
    bytes_read: int = 0
    steps: int = 0
    tokens_per_expert: dict[int, list[int]] = field(default_factory=dict)  # layer -> routed tokens per expert
    expert_map: ExpertMap | None = None  # None: the router holds every expert
    channel: ChannelStats | None = None  # None without workers (or before it connected)
    vision: ImageStats | None = None  # None: the model takes no images


@dataclass(frozen=True)
class WorkerStats:
    """ExpertWorker.stats()."""

    slot: int = 0
    pid: int = 0
    state: MemberState = MemberState.LOADING
    device: str = ""
    generation: int = -1  # the newest expert map it holds; -1 before it loaded
    experts: dict[int, list[int]] = field(default_factory=dict)  # layer -> the experts it holds
    bytes_resident: int = 0
    expert_dtype: str = ""  # how its routed experts are held: "fp8" (with per-channel scales), "bfloat16", ...
    bytes_read: int = 0
    tokens_per_expert: dict[int, dict[int, int]] = field(default_factory=dict)  # layer -> expert -> tokens served
    steps: int = 0
    routers: tuple[int, ...] = ()  # the routers whose group it is in


@dataclass(frozen=True)
class EncoderStats:
    """VisionEncoderActor.stats()."""

    index: int = 0
    pid: int = 0
    device: str = ""
    encoded: int = 0
    seconds: float = 0.0  # spent encoding
    loaded: bool = False


@dataclass(frozen=True)
class MemberStatus:
    """One place in the cluster as the supervisor sees it."""

    slot: int = 0  # the worker slot, router id or encoder index
    state: MemberState = MemberState.SERVING
    replacements: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class SupervisorCounters:
    deaths: dict[ActorKind, int] = field(default_factory=dict)  # by kind; a kind absent: none died
    replacements_started: int = 0
    replacements_succeeded: int = 0
    replacements_failed: int = 0
    rebalances: int = 0

    def died(self, kind: ActorKind) -> int:
        return self.deaths.get(kind, 0)


@dataclass(frozen=True)
class SupervisorStatus:
    """Supervisor.status(): the map in use, the verdict, and every place's state."""

    generation: int = 0
    failure: str | None = None  # set once the cluster cannot serve any more
    degraded: dict[int, str] = field(default_factory=dict)  # worker slot -> why it is no longer replaced
    degraded_routers: dict[int, str] = field(default_factory=dict)  # router id -> why
    slots: tuple[MemberStatus, ...] = ()  # the worker slots, in order
    routers: tuple[MemberStatus, ...] = ()
    encoders: tuple[MemberStatus, ...] = ()
    counters: SupervisorCounters = SupervisorCounters()
    expert_map: ExpertMap | None = None

    def of(self, kind: ActorKind) -> dict[int, MemberStatus]:
        """Index -> status of every place of `kind`."""
        members = {ActorKind.WORKER: self.slots, ActorKind.ROUTER: self.routers, ActorKind.ENCODER: self.encoders}
        return {m.slot: m for m in members[kind]}
