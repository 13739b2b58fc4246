"""Rebalancing: hot experts get extra copies, the max/mean load per worker falls, every expert keeps its minimum
number of copies, a slot never holds an expert twice, and with no skew nothing improves."""

from __future__ import annotations

import pytest

from cluster.expert_map import ExpertMap
from cluster.rebalance import imbalance, plan_rebalance, slot_loads

SKEWED = {0: [5000, 4000] + [20] * 14, 1: [10] * 16}  # most tokens to two experts of layer 0


def test_a_skewed_load_gets_copies_of_its_hot_experts_and_evens_out():
    before = ExpertMap.even(16, [0, 1], 4)
    plan = plan_rebalance(before, SKEWED, extra_per_slot=2)
    assert plan.before > 2.0 and plan.after < 1.3 and plan.after < plan.before
    assert len(plan.expert_map.copies(0, 0)) >= 2 and len(plan.expert_map.copies(0, 1)) >= 2
    assert plan.expert_map.generation == before.generation + 1
    assert imbalance(slot_loads(plan.expert_map, SKEWED)) == pytest.approx(plan.after)


def test_every_expert_keeps_the_configured_copies_and_slots_stay_within_capacity():
    plan = plan_rebalance(ExpertMap.even(16, [0, 1], 4, replicas=2), SKEWED, extra_per_slot=1, min_copies=2)
    m = plan.expert_map
    for layer in (0, 1):
        assert all(len(m.copies(layer, e)) >= 2 for e in range(16))
        assert all(len(m.experts_of(w, layer)) <= 16 * 2 // 4 + 1 for w in range(4))
        assert all(len(set(m.experts_of(w, layer))) == len(m.experts_of(w, layer)) for w in range(4))


def test_an_even_load_gives_nothing_to_improve():
    even = ExpertMap.even(16, [0], 4)
    plan = plan_rebalance(even, {0: [100] * 16}, extra_per_slot=0)
    assert plan.before == pytest.approx(1.0) and plan.after == pytest.approx(1.0)


def test_no_load_at_all_is_balanced():
    assert imbalance([0.0, 0.0]) == 1.0
