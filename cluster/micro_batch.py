"""Splitting a step's batch into micro-batches, so that the router computes attention for one while the expert
workers compute another's experts (ping-pong; cluster/model.py runs them).

A micro-batch is a contiguous run of the step's sequences, so its rows are a contiguous slice of the flat batch and
the outputs concatenate back in order. The runs are balanced by tokens; a sequence is never cut (its new tokens
attend to each other). The split depends on the batch alone, so a replayed step splits the same way.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

from cluster.batch import ForwardBatch, SeqSlice


@dataclass(frozen=True)
class MicroBatch:
    rows: slice  # its rows in the step's flat batch
    batch: ForwardBatch  # its sequences, rows counted from its own first row


def split_batch(batch: ForwardBatch, parts: int) -> tuple[MicroBatch, ...]:
    """At most `parts` micro-batches (never more than there are sequences), in batch order."""
    seqs = batch.seqs
    parts = max(1, min(parts, len(seqs)))
    if parts == 1:
        return (MicroBatch(slice(0, batch.num_tokens), batch),)
    ends = list(itertools.accumulate(s.length for s in seqs))
    cuts = [0]
    for i in range(1, parts):  # the first sequence that ends at or past i/parts of the tokens closes part i
        want = bisect.bisect_left(ends, ends[-1] * i / parts) + 1
        cuts.append(min(max(want, cuts[-1] + 1), len(seqs) - (parts - i)))
    cuts.append(len(seqs))
    return tuple(_micro_batch(seqs[a:b]) for a, b in itertools.pairwise(cuts))


def _micro_batch(seqs: tuple[SeqSlice, ...]) -> MicroBatch:
    first = seqs[0].start
    rebased = tuple(SeqSlice(s.start - first, s.length, s.pos0, s.slot) for s in seqs)
    return MicroBatch(slice(first, seqs[-1].end), ForwardBatch(rebased))
