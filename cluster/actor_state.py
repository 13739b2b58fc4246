"""The vocabulary the actors speak about each other: the kinds of actor, the state of a cluster member and of a
router's channel, and how an expert worker's loop ended. Plain enums and one frozen dataclass, so they pickle
across Ray; the routers, the workers, the supervisor and the gateway all import them from here.

The enum values are the words the wire and the logs use (`WorkerStatus.state`, `RouterStatus.state`,
`ExpertPlaneStatus.state` carry `.value`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ActorKind(Enum):
    """The three kinds of actor the supervisor keeps at full strength."""

    ROUTER = "router"
    WORKER = "worker"
    ENCODER = "encoder"

    @property
    def title(self) -> str:
        """How logs and errors name one: "expert worker 3", "router 0", "vision encoder 1"."""
        return {ActorKind.WORKER: "expert worker", ActorKind.ENCODER: "vision encoder"}.get(self, self.value)


class MemberState(Enum):
    """A place in the cluster (a worker slot, a router, a vision encoder) as the supervisor sees it; LOADING,
    JOINING and CONNECTING are the states of a replacement. A worker reports LOADING, JOINING, SERVING itself."""

    LOADING = "loading"  # reading its weights
    JOINING = "joining"  # a worker that has loaded, waiting for every router to admit it
    CONNECTING = "connecting"  # a router forming its group with the live workers
    SERVING = "serving"
    DEAD = "dead"  # until its replacement starts (or for good, once the replacement policy gave up)

    @property
    def live(self) -> bool:
        """Holds its experts and will serve (a worker that serves or waits to be admitted)."""
        return self in (MemberState.SERVING, MemberState.JOINING)


class ChannelState(Enum):
    """A router's channel to its expert workers (and the router's own state in its health)."""

    STARTING = "starting"
    SERVING = "serving"
    RECOVERING = "recovering"  # a failover in progress: requests wait, none fail
    HOLDING = "holding"  # some expert has no live copy: waiting for a replacement
    FAILED = "failed"  # the supervisor gave up: requests end with its reason
    STOPPED = "stopped"

    @property
    def takes_requests(self) -> bool:
        """A failover holds requests, it does not refuse them."""
        return self in (ChannelState.SERVING, ChannelState.RECOVERING, ChannelState.HOLDING)


class LoopEndKind(Enum):
    STOPPED = "stopped"  # the router said STOP
    REGROUP = "regroup"  # the router said REGROUP (a planned regroup: admit a replacement)
    FENCED = "fenced"  # the group broke (a peer died, or the router closed the epoch); the worker is fine
    DEAD = "dead"  # the actor is gone (died, unreachable, or killed as hung)
    FAILED = "failed"  # its loop raised: a bug; the router kills it so it is gone for good


@dataclass(frozen=True)
class LoopEnd:
    """How one epoch of an expert worker's loop ended (`ExpertWorker.serve` returns the first three kinds; the
    router's link to it makes DEAD and FAILED from the Ray error)."""

    kind: LoopEndKind
    reason: str = ""  # for people and logs: why, naming the worker

    @property
    def alive(self) -> bool:
        """The worker is alive and can join the next epoch."""
        return self.kind in (LoopEndKind.STOPPED, LoopEndKind.REGROUP, LoopEndKind.FENCED)

    def describe(self) -> str:
        return self.reason or self.kind.value


STOPPED = LoopEnd(LoopEndKind.STOPPED)
REGROUPED = LoopEnd(LoopEndKind.REGROUP)
FENCED = LoopEnd(LoopEndKind.FENCED)
