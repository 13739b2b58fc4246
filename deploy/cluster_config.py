"""The `cluster:` section of the serve config: which actors run where, with what resources, and the bounds on
starting them and on their collectives. The launcher reads it as it is (`with_vision` settles the one key whose
default depends on the checkpoint)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cluster.config import ModelConfig
from cluster.expert_map import ExpertMap, PlacementError
from cluster.settings import (
    Invalid,
    SettingError,
    Settings,
    byte_size,
    choice,
    integer,
    is_int,
    number,
    optional,
    section,
    setting,
    text,
)

Placement = str | dict[int, tuple[tuple[int, ...], ...]]
_BUILT_IN = ("CPU", "GPU", "memory")


def _custom_resources(v: Any) -> dict[str, float] | None:
    if v is None:
        return None
    ok = isinstance(v, Mapping) and all(isinstance(k, str) and k and k not in _BUILT_IN for k in v)
    if not ok:
        raise Invalid(f"expected a mapping of custom resource names (not {'/'.join(_BUILT_IN)}) to amounts, got {v!r}")
    return {k: number(0)(amount) for k, amount in v.items()}


@dataclass(frozen=True)
class ResourceConfig(Settings):
    """What one Ray actor asks for (and its placement-group bundle holds)."""

    num_cpus: float | None = setting(None, optional(number(0)))  # None: 1 on cuda, 0.5 on cpu (a 2-CPU head fits
    # the tiny model's router and two workers)
    num_gpus: float | None = setting(None, optional(number(0)))  # None: 1 on cuda, else 0
    memory: int | None = setting(None, optional(byte_size()))  # Ray's memory accounting for the actor; None: none
    resources: dict[str, float] = setting(None, _custom_resources)  # Ray custom resources, e.g. {expert_node: 1}
    # to pin this role to the nodes that offer them (`ray start --resources`); None: none

    def cpus(self, device: str) -> float:
        return self.num_cpus if self.num_cpus is not None else (1.0 if device == "cuda" else 0.5)

    def gpus(self, device: str) -> float:
        return self.num_gpus if self.num_gpus is not None else (1.0 if device == "cuda" else 0.0)

    def bundle(self, device: str) -> dict[str, float]:
        """The placement-group bundle (and the actor's request) for this role."""
        out = {"CPU": self.cpus(device)}
        if self.gpus(device):
            out["GPU"] = self.gpus(device)
        if self.memory:
            out["memory"] = float(self.memory)
        return {**out, **(self.resources or {})}


_RANGES = re.compile(r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$")
_PLACEMENT_FORMS = (
    "expected null, expert ranges per worker like '0-5;6-10;11-15', "
    "or a mapping MoE layer -> list of expert lists (one per worker)"
)


def _placement(v: Any) -> Placement | None:
    """Checks the shape only; which experts and layers exist is checked against the model at start-up."""
    if v is None:
        return None
    if isinstance(v, str) and all(_RANGES.match(part) for part in v.split(";")):
        return v
    if isinstance(v, Mapping) and v:
        per_layer = {_layer_key(k): _expert_groups(k, groups) for k, groups in v.items()}
        if len({len(groups) for groups in per_layer.values()}) > 1:
            counts = {layer: len(groups) for layer, groups in per_layer.items()}
            raise Invalid(f"every layer must be split over the same number of workers, got {counts}")
        return per_layer
    raise Invalid(f"{_PLACEMENT_FORMS}, got {v!r}")


def _layer_key(k: Any) -> int:
    if (is_int(k) and k >= 0) or (isinstance(k, str) and k.isdigit()):
        return int(k)
    raise Invalid(f"layer keys must be integers >= 0, got {k!r}")


def _expert_groups(layer: Any, groups: Any) -> tuple[tuple[int, ...], ...]:
    ok = (
        isinstance(groups, (list, tuple))
        and groups
        and all(isinstance(g, (list, tuple)) and g and all(is_int(e) and e >= 0 for e in g) for g in groups)
    )
    if not ok:
        raise Invalid(f"layer {layer}: expected a list of non-empty expert lists (one per worker), got {groups!r}")
    return tuple(tuple(g) for g in groups)


def placement_workers(placement: Placement | None) -> int | None:
    """How many workers a placement names (None when there is no placement)."""
    if placement is None:
        return None
    if isinstance(placement, str):
        return len(placement.split(";"))
    return max(len(groups) for groups in placement.values())


@dataclass(frozen=True)
class ClusterConfig(Settings):
    device: str = setting("cpu", choice("cpu", "cuda"))  # cuda: one GPU per actor, NCCL; cpu: gloo
    routers: int = setting(1, integer(1))  # attention routers; each has its own engine and KV cache
    workers: int = setting(2, integer(0))  # expert workers; 0: every expert in the router's process
    expert_replicas: int = setting(1, integer(1))  # copies of each expert on distinct workers (failover without a
    # stall needs 2: a death is then covered by the surviving copies at once)
    router_resources: ResourceConfig = section(ResourceConfig)
    worker_resources: ResourceConfig = section(ResourceConfig)
    placement: Placement | None = setting(None, _placement)  # None: an even contiguous split
    collective_timeout_s: float = setting(60.0, number(0, above=True))  # a stuck collective fails after this
    startup_timeout_s: float = setting(600.0, number(0, above=True))  # placement + weights + rendezvous, together
    ray_address: str | None = setting(None, optional(text))  # None: a private local Ray; "auto": join the cluster
    hang_timeout_s: float = setting(5.0, number(0, above=True))  # two stalls, one bound: a step without progress
    # this long (workers that do not answer a ping are declared hung and killed, then replaced), and an image encode
    # without an answer this long (the encoder is pinged; no answer: killed, the image retried elsewhere)
    max_replacement_failures: int = setting(3, integer(1))  # replacements of one slot that may fail within
    replacement_window_s: float = setting(300.0, number(0, above=True))  # this window before giving up on it
    rebalance_interval_s: float | None = setting(None, optional(number(0, above=True)))  # None: rebalance only on
    # request (`moecluster client rebalance`)
    redundant_experts_per_worker: int = setting(0, integer(0))  # room each worker keeps for extra copies of hot
    # experts when rebalancing
    vision_encoders: int | None = setting(None, optional(integer(0)))  # vision encoder actors; None: 1 when the
    # checkpoint has a vision tower, else 0; 0: each router encodes images itself (on a thread beside its engine)
    vision_encoder_resources: ResourceConfig = section(ResourceConfig)
    vision_cache_memory: int = setting(256 * 2**20, byte_size())  # each router's cache of image features, by content

    def check_across(self) -> None:
        if self.device == "cuda":
            roles = [("router_resources", self.router_resources)] + (
                [("worker_resources", self.worker_resources)] if self.workers > 0 else []
            )
            for key, res in roles:
                if res.gpus("cuda") < 1:
                    raise SettingError(
                        f"{key}.num_gpus",
                        f"device cuda runs each actor on its own GPU: expected a number >= 1, got {res.num_gpus!r}",
                    )
        named = placement_workers(self.placement)
        if named is not None and named != self.workers:
            raise SettingError(
                "placement",
                f"names {named} workers but cluster.workers is {self.workers}; give one expert list per worker",
            )
        if self.placement is not None and self.workers == 0:
            raise SettingError("placement", "needs workers >= 1; with 0 workers the router holds every expert")
        if self.workers and self.expert_replicas > self.workers:
            raise SettingError(
                "expert_replicas",
                f"{self.expert_replicas} copies of each expert need as many "
                f"workers (one copy per worker): expected 1..{self.workers} with {self.workers} workers",
            )
        if self.placement is not None and self.expert_replicas != 1:
            raise SettingError(
                "expert_replicas",
                "an explicit placement lists its replicas itself (an expert named "
                "on several workers has that many copies); leave expert_replicas at 1",
            )

    def with_vision(self, has_vision_tower: bool) -> ClusterConfig:
        """This config with `vision_encoders` settled for a checkpoint with or without a vision tower."""
        if self.vision_encoders is None:
            return dataclasses.replace(self, vision_encoders=1 if has_vision_tower else 0)
        if self.vision_encoders and not has_vision_tower:
            raise SettingError(
                "vision_encoders",
                f"is {self.vision_encoders}, but the checkpoint has no vision tower: expected 0 (or leave it unset)",
            )
        return self

    @property
    def encoders(self) -> int:
        """Vision encoder actors to start (None, unsettled, counts none: see `with_vision`)."""
        return self.vision_encoders or 0

    def expert_map(self, cfg: ModelConfig) -> ExpertMap | None:
        """The starting map for this model (None for `workers: 0`: the router then holds every expert); raises
        PlacementError naming the setting when the experts cannot be placed as asked."""
        if self.workers == 0:
            return None
        if self.placement:
            expert_map = ExpertMap.from_spec(self.placement, cfg.num_local_experts, cfg.moe_layers)
            if expert_map.num_workers != self.workers:
                raise PlacementError(
                    f"cluster.placement names {expert_map.num_workers} workers but cluster.workers is {self.workers}"
                )
            return expert_map
        return ExpertMap.even(cfg.num_local_experts, cfg.moe_layers, self.workers, self.expert_replicas)
