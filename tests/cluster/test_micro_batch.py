"""Micro-batches are contiguous runs of whole sequences that cover the batch in order, balanced by tokens, never
more of them than there are sequences."""

from __future__ import annotations

import itertools

import pytest

from cluster.batch import ForwardBatch, SeqSlice
from cluster.micro_batch import split_batch


def batch_of(lengths: list[int]) -> ForwardBatch:
    starts = itertools.accumulate(lengths, initial=0)
    return ForwardBatch(tuple(SeqSlice(a, n, 3 * i, 10 + i) for i, (a, n) in enumerate(zip(starts, lengths))))


@pytest.mark.parametrize(
    "lengths, parts, sizes",
    [
        ([1] * 8, 2, [4, 4]),  # decode: equal halves
        ([1] * 7, 2, [4, 3]),
        ([1] * 5, 3, [2, 2, 1]),
        ([5] * 6, 3, [10, 10, 10]),
        ([30, 1, 1, 1], 2, [30, 3]),  # a prefill piece is never cut
        ([1, 1, 1, 30], 2, [3, 30]),
        ([1, 1], 4, [1, 1]),  # no more parts than sequences
        ([17], 2, [17]),
    ],
)
def test_split_covers_the_batch_in_order_balanced_by_tokens(lengths, parts, sizes):
    batch = batch_of(lengths)
    micro = split_batch(batch, parts)
    assert [m.batch.num_tokens for m in micro] == sizes
    assert [m.rows for m in micro] == [
        slice(a, b) for a, b in itertools.pairwise(itertools.accumulate(sizes, initial=0))
    ]
    flat = [SeqSlice(s.start + m.rows.start, s.length, s.pos0, s.slot) for m in micro for s in m.batch.seqs]
    assert tuple(flat) == batch.seqs  # the same sequences, rows re-based to each micro-batch
    assert all(m.batch.seqs[0].start == 0 for m in micro)


def test_one_part_is_the_batch_itself():
    batch = batch_of([3, 1, 1])
    (only,) = split_batch(batch, 1)
    assert only.batch is batch and only.rows == slice(0, 5)
