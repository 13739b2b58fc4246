"""Expert load balancing (DeepSeek's EPLB, simplified): from the tokens each expert received, a new map in which hot
experts have extra copies and each worker carries about the same load. No torch here.

Per MoE layer:
  1. copies: every expert starts with `min_copies` (the configured replicas, so failover still finds a copy);
     while the slots have room, the expert with the most load per copy gets one more copy (at most one per slot).
  2. pack: copies, heaviest (load per copy) first, go to the least-loaded slot that has room and does not hold
     that expert yet; among equally loaded slots one that already holds the expert wins, so fewer weights move.
A slot has room for ceil(min_copies * E / N) + `extra_per_slot` experts: its share of the required copies plus the
redundant slots the config gives it.
A copy's load is its expert's load divided by the expert's copies: the routers rotate an expert's steps over its
live copies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cluster.expert_map import ExpertMap


@dataclass(frozen=True)
class RebalancePlan:
    expert_map: ExpertMap  # the next generation
    before: float  # max / mean load per worker, under the current map (summed over layers)
    after: float  # the same under the new map
    moved: int  # expert copies that workers must read from the checkpoint


def slot_loads(expert_map: ExpertMap, loads: Mapping[int, Sequence[float]]) -> list[float]:
    """Load per slot, summed over layers, when each expert's load is split evenly over its copies."""
    per_slot = [0.0] * expert_map.num_workers
    for layer in expert_map.layers:
        for expert, load in enumerate(loads.get(layer, ())):
            copies = expert_map.copies(layer, expert)
            for slot in copies:
                per_slot[slot] += load / len(copies)
    return per_slot


def imbalance(per_slot: Sequence[float]) -> float:
    """max / mean (1.0: perfectly even; also 1.0 with no load at all)."""
    mean = sum(per_slot) / len(per_slot)
    return max(per_slot) / mean if mean > 0 else 1.0


def plan_rebalance(
    expert_map: ExpertMap, loads: Mapping[int, Sequence[float]], extra_per_slot: int, min_copies: int = 1
) -> RebalancePlan:
    """The map for these loads (tokens per expert per layer since the last rebalance)."""
    n, e = expert_map.num_workers, expert_map.num_experts
    min_copies = min(min_copies, n)
    capacity = math.ceil(min_copies * e / n) + extra_per_slot
    holdings = {}
    for layer in expert_map.layers:
        layer_loads = [float(x) for x in loads.get(layer, [0.0] * e)]
        copies = _copies(layer_loads, n, capacity, min_copies)
        holdings[layer] = _pack(layer_loads, copies, n, capacity, expert_map.holdings[layer])
    new_map = expert_map.successor(holdings)
    moved = sum(
        len(set(new_map.holdings[layer][w]) - set(expert_map.holdings[layer][w]))
        for layer in expert_map.layers
        for w in range(n)
    )
    return RebalancePlan(
        new_map, imbalance(slot_loads(expert_map, loads)), imbalance(slot_loads(new_map, loads)), moved
    )


def _copies(loads: list[float], n: int, capacity: int, min_copies: int) -> list[int]:
    copies = [min_copies] * len(loads)
    room = n * capacity - sum(copies)
    while room > 0:
        candidates = [x for x in range(len(loads)) if copies[x] < n and loads[x] > 0]
        if not candidates:
            break
        hottest = max(candidates, key=lambda x: (loads[x] / copies[x], -x))
        copies[hottest] += 1
        room -= 1
    return copies


def _pack(
    loads: list[float], copies: list[int], n: int, capacity: int, current: Sequence[Sequence[int]]
) -> list[list[int]]:
    items = sorted(
        ((loads[x] / copies[x], x) for x in range(len(loads)) for _ in range(copies[x])),
        key=lambda item: (-item[0], item[1]),
    )
    held: list[list[int]] = [[] for _ in range(n)]
    slot_load = [0.0] * n
    for load, expert in items:
        open_slots = [w for w in range(n) if len(held[w]) < capacity and expert not in held[w]]
        assert open_slots, "capacity is at least one copy of every expert, at most one per slot"
        best = min(open_slots, key=lambda w: (slot_load[w], expert not in current[w], len(held[w]), w))
        held[best].append(expert)
        slot_load[best] += load
    return [sorted(experts) for experts in held]
