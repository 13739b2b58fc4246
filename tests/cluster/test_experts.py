"""Grouped expert compute: the torch._grouped_mm fast path and the per-expert loop agree with a per-row
reference on fresh random inputs, including experts that receive no rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cluster.experts import ExpertShard, expert_segments, grouped_mm_supported

D, I, E = 32, 48, 6


def shard(seed=0) -> ExpertShard:
    g = torch.Generator().manual_seed(seed)
    return ExpertShard(tuple(range(E)), torch.randn(E, D, 2 * I, generator=g), torch.randn(E, I, D, generator=g))


def per_row_reference(s: ExpertShard, x_RD, local_R):
    out = []
    for x, e in zip(x_RD, local_R.tolist()):
        gu = x @ s.gate_up_EDI2[e]
        out.append((gu[I:] * F.silu(gu[:I])) @ s.down_EID[e])
    return torch.stack(out)


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_forward_matches_per_row_reference(rows):
    s = shard()
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, D, generator=g)
    local = torch.randint(0, E - 2, (rows,), generator=g)  # the last two experts get nothing
    torch.testing.assert_close(s.forward(x, local), per_row_reference(s, x, local), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 7], [0, 0, 0, 0, 0, 1], [10, 0, 0, 0, 0, 0]])
def test_grouped_mm_path_equals_the_per_expert_loop(counts):
    s = shard(1)
    x = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(2))
    assert grouped_mm_supported(x, s.gate_up_EDI2, s.down_EID)
    fast = expert_segments(x, counts, s.gate_up_EDI2, s.down_EID, grouped=True)
    loop = expert_segments(x, counts, s.gate_up_EDI2, s.down_EID, grouped=False)
    torch.testing.assert_close(fast, loop, rtol=1e-5, atol=1e-4)


def test_counts_padded_past_the_shard_are_accepted_when_empty():
    s = shard()
    x = torch.randn(4, D)
    y = s.forward_sorted(x, [1, 1, 1, 1, 0, 0, 0, 0])  # the transport pads to the largest shard
    torch.testing.assert_close(y, per_row_reference(s, x, torch.tensor([0, 1, 2, 3])), rtol=1e-5, atol=1e-4)
