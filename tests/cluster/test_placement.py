"""Expert placement: even and uneven splits, explicit specs, and start-up errors that say what to change."""

from __future__ import annotations

import pytest
import torch

from cluster.placement import ExpertPlacement, PlacementError


def test_even_split_of_16_experts_on_3_workers_is_6_5_5():
    p = ExpertPlacement.even(16, [0, 1], 3)
    assert [len(p.experts_of(w, 0)) for w in range(3)] == [6, 5, 5]
    assert p.experts_of(1, 1) == tuple(range(6, 11))
    assert p.max_local_experts(0) == 6


def test_routing_tables_give_owner_and_local_index():
    owner, local = ExpertPlacement.even(5, [3], 2).routing_tables(3, torch.device("cpu"))
    assert owner.tolist() == [0, 0, 0, 1, 1]
    assert local.tolist() == [0, 1, 2, 0, 1]


def test_spec_string_with_ranges_and_lists():
    p = ExpertPlacement.from_spec("0-5,8;6,7,9-15", 16, [1, 3])
    assert p.num_workers == 2
    assert p.experts_of(0, 3) == (0, 1, 2, 3, 4, 5, 8)
    assert p.experts_of(1, 1) == (6, 7, 9, 10, 11, 12, 13, 14, 15)


def test_per_layer_mapping_may_differ_between_layers():
    p = ExpertPlacement.from_spec({0: [[0, 1], [2, 3]], 1: [[3], [0, 1, 2]]}, 4, [0, 1])
    assert p.experts_of(0, 0) == (0, 1) and p.experts_of(0, 1) == (3,)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("0-7;8-14", r"experts \[15\] have no worker"),
        ("0-8;8-15", "expert 8 is given to both worker 0 and worker 1"),
        ("0-15;16", "expert 16 does not exist"),
        ("0-15;", "worker 1 owns no expert"),
        ("0-x;1", "cannot read '0-x'"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(PlacementError, match=message):
        ExpertPlacement.from_spec(spec, 16, [0])


def test_more_workers_than_experts_is_refused_with_the_limit():
    with pytest.raises(PlacementError, match=r"17 workers is more than the 16 experts per layer.*at most 16 workers"):
        ExpertPlacement.even(16, [0], 17)


def test_placement_must_cover_exactly_the_moe_layers():
    with pytest.raises(PlacementError, match=r"missing \[3\]"):
        ExpertPlacement.from_spec({1: [[0, 1]]}, 2, [1, 3])
