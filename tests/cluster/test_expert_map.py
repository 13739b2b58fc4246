"""The expert map: even splits with and without replicas, explicit specs that list replicas, coverage of live
slots, and start-up errors that name the setting and say what to change."""

from __future__ import annotations

import pytest

from cluster.expert_map import ExpertMap, PlacementError


def test_even_split_of_16_experts_on_3_workers_is_6_5_5():
    m = ExpertMap.even(16, [0, 1], 3)
    assert [len(m.experts_of(w, 0)) for w in range(3)] == [6, 5, 5]
    assert m.experts_of(1, 1) == tuple(range(6, 11))
    assert m.max_local_experts(0) == 6 and m.replicas() == 1


def test_replicas_put_each_expert_on_that_many_distinct_workers():
    m = ExpertMap.even(16, [0], 3, replicas=2)
    for expert in range(16):
        assert len(m.copies(0, expert)) == 2
    assert m.replicas() == 2
    assert [len(m.experts_of(w, 0)) for w in range(3)] == [11, 11, 10]  # its block plus the previous worker's


def test_with_as_many_replicas_as_workers_every_worker_holds_every_expert():
    m = ExpertMap.even(16, [3], 2, replicas=2)
    assert m.experts_of(0, 3) == m.experts_of(1, 3) == tuple(range(16))


@pytest.mark.parametrize("replicas", [0, 4])
def test_replicas_beyond_the_workers_are_refused_naming_the_setting(replicas):
    with pytest.raises(PlacementError, match=r"cluster\.expert_replicas: .* expected 1\.\.3 with 3 workers"):
        ExpertMap.even(16, [0], 3, replicas=replicas)


def test_uncovered_lists_the_experts_without_a_live_copy():
    single = ExpertMap.even(16, [0, 1], 2)
    assert single.uncovered({0}) == {0: list(range(8, 16)), 1: list(range(8, 16))}
    assert single.uncovered({0, 1}) == {}
    assert ExpertMap.even(16, [0], 3, replicas=2).uncovered({1, 2}) == {}


def test_spec_string_with_ranges_lists_and_replicas():
    m = ExpertMap.from_spec("0-5,8;6,7,9-15;0-3", 16, [1, 3])
    assert m.num_workers == 3
    assert m.experts_of(0, 3) == (0, 1, 2, 3, 4, 5, 8)
    assert m.copies(3, 2) == (0, 2) and m.copies(3, 9) == (1,)


def test_per_layer_mapping_may_differ_between_layers():
    m = ExpertMap.from_spec({0: [[0, 1], [2, 3]], 1: [[3], [0, 1, 2]]}, 4, [0, 1])
    assert m.experts_of(0, 0) == (0, 1) and m.experts_of(0, 1) == (3,)


def test_local_order_is_ascending_whatever_order_the_spec_lists():
    assert ExpertMap.from_spec("9,3,5;0-2,4,6-8,10-15", 16, [0]).experts_of(0, 0) == (3, 5, 9)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("0-7;8-14", r"experts \[15\] have no worker"),
        ("0-8,8;9-15", r"worker 0 lists experts \[8\] twice"),
        ("0-15;16", "expert 16 does not exist"),
        ("0-15;", "worker 1 holds no expert"),
        ("0-x;1", "cannot read '0-x'"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(PlacementError, match=message):
        ExpertMap.from_spec(spec, 16, [0])


def test_more_workers_than_experts_is_refused_with_the_limit():
    with pytest.raises(PlacementError, match=r"17 workers is more than the 16 experts per layer.*at most 16 workers"):
        ExpertMap.even(16, [0], 17)


def test_placement_must_cover_exactly_the_moe_layers():
    with pytest.raises(PlacementError, match=r"missing \[3\]"):
        ExpertMap.from_spec({1: [[0, 1]]}, 2, [1, 3])


def test_successor_bumps_the_generation_and_keeps_the_slots():
    m = ExpertMap.even(4, [0], 2)
    nxt = m.successor({0: [[0, 1, 2], [2, 3]]})
    assert (nxt.generation, nxt.copies(0, 2)) == (1, (0, 1))
    with pytest.raises(PlacementError, match="keep the 2 worker slots"):
        m.successor({0: [[0, 1, 2, 3]]})
