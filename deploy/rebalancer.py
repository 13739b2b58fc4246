"""Applies a rebalanced expert map without stopping: every worker loads the copies it lacks beside the ones it
serves, every router switches at its next step boundary (the step header carries the map generation, so a worker
always serves a step with the matching copies), then the workers free the copies the new map no longer needs."""

from __future__ import annotations

import logging
import time

import ray

from cluster.expert_map import ExpertMap
from cluster.rebalance import RebalancePlan, plan_rebalance

log = logging.getLogger(__name__)
POLL_S = 0.1


def loads_per_expert(routers: list, timeout_s: float) -> dict[int, list[int]]:
    """layer -> tokens routed to each expert so far, summed over the routers."""
    stats = ray.get([r.stats.remote() for r in routers], timeout=timeout_s)
    total: dict[int, list[int]] = {}
    for s in stats:
        for layer, counts in s.tokens_per_expert.items():
            row = total.setdefault(layer, [0] * len(counts))
            total[layer] = [a + b for a, b in zip(row, counts)]
    return total


def difference(now: dict[int, list[int]], before: dict[int, list[int]]) -> dict[int, list[int]]:
    return {
        layer: [a - b for a, b in zip(counts, before.get(layer, [0] * len(counts)))] for layer, counts in now.items()
    }


def plan(expert_map: ExpertMap, loads: dict[int, list[int]], extra: int, min_copies: int) -> RebalancePlan | None:
    """The next map, or None when it would not lower the max/mean load per worker."""
    proposal = plan_rebalance(expert_map, loads, extra, min_copies)
    if proposal.after >= proposal.before - 1e-9:
        log.info("rebalance skipped: max/mean load per worker %.3f would not improve", proposal.before)
        return None
    return proposal


def apply(proposal: RebalancePlan, routers: list, workers: list, load_timeout_s: float, ray_timeout_s: float) -> None:
    new_map = proposal.expert_map
    started = time.monotonic()
    ray.get([w.prepare_map.remote(new_map) for w in workers], timeout=load_timeout_s)
    ray.get([r.use_map.remote(new_map) for r in routers], timeout=ray_timeout_s)
    deadline = time.monotonic() + load_timeout_s
    while time.monotonic() < deadline:  # every router switches at its next step boundary
        generations = ray.get([r.map_generation.remote() for r in routers], timeout=ray_timeout_s)
        if all(g == new_map.generation for g in generations):
            break
        time.sleep(POLL_S)
    else:
        raise RuntimeError(f"the routers did not switch to map generation {new_map.generation} in time")
    ray.get([w.retire_maps.remote(new_map.generation) for w in workers], timeout=ray_timeout_s)
    log.warning(
        "rebalanced to map generation %d in %.2fs: max/mean load per worker %.2f -> %.2f, %d expert copies loaded",
        new_map.generation,
        time.monotonic() - started,
        proposal.before,
        proposal.after,
        proposal.moved,
    )
