"""The "did the kill hit the load" check of the failure benchmarks and fault tests (deploy/bench/interruption.py),
on recorded token arrival times: it fails for a kill after the load (the defect a fixed delay caused: a failover
that never happened printed a 24 ms "stall"), for a kill before a stream started, and passes only when every
stream got tokens on both sides; the kill waits for every stream to generate with tokens left; the benchmarks'
rows say "kill landed after the load" instead of a figure when the check fails."""

from __future__ import annotations

import argparse
import itertools
import time

import pytest

from deploy.bench import failover, routers
from deploy.bench.interruption import (
    AFTER_LOAD,
    StreamLog,
    interrupted,
    kill_when_ready,
    margin,
    ready_to_kill,
    too_late,
)

# 8 streams of 64 tokens, a token every 10 ms from t = 1.0 s (the tiny model on a fast machine: over in 0.64 s)
RUN = [[1.0 + 0.01 * k + 0.001 * s for k in range(64)] for s in range(8)]


def test_a_kill_after_the_load_is_not_an_interruption():
    assert not interrupted(RUN, kill_at=2.0)  # the fixed 1 s delay: every token came before the kill


def test_a_kill_while_every_stream_generates_is_one():
    assert interrupted(RUN, kill_at=1.2)


def test_a_kill_before_a_stream_started_or_after_one_ended_is_not_one():
    late_starter = [*RUN[:7], [t + 0.5 for t in RUN[7]]]  # stream 7 gets its first token at 1.507
    assert not interrupted(late_starter, kill_at=1.2)
    early_finisher = [*RUN[:7], RUN[7][:10]]  # stream 7 ends at 1.097
    assert not interrupted(early_finisher, kill_at=1.2)


def test_tokens_after_the_window_do_not_count():
    assert interrupted(RUN, kill_at=1.2, until=1.3)
    assert not interrupted(RUN, kill_at=1.2, until=1.2005)  # the next kill came first: no token between them
    assert not interrupted([], kill_at=1.2)  # no stream: nothing was interrupted


def log(max_tokens: int, tokens: int, done: bool = False) -> StreamLog:
    entry = StreamLog(max_tokens)
    entry.add(tokens, at=1.0)
    entry.done = done
    return entry


@pytest.mark.parametrize(
    ("logs", "ready", "late"),
    [
        ([log(64, 1), log(64, 5)], True, False),
        ([log(64, 1), log(64, 0)], False, False),  # one has no token yet
        ([log(64, 1), log(64, 64 - margin(64) + 1)], False, True),  # one is within its last eighth
        ([log(64, 1), log(64, 3, done=True)], False, True),  # one has ended (an error, say)
        ([], False, False),
    ],
    ids=["all generating", "one not started", "one nearly done", "one ended", "no streams"],
)
def test_ready_to_kill_needs_every_stream_generating_with_tokens_left(logs, ready, late):
    assert (ready_to_kill(logs), too_late(logs)) == (ready, late)


def test_kill_when_ready_waits_for_ready_kills_at_once_when_late_and_is_bounded():
    kills = []
    start = time.perf_counter()
    flips = iter([False, False, True])
    at = kill_when_ready(lambda: next(flips), lambda: False, lambda: kills.append("ready"))
    assert kills == ["ready"] and at >= start
    kill_when_ready(lambda: False, lambda: True, lambda: kills.append("late"))
    assert kills == ["ready", "late"]
    with pytest.raises(TimeoutError, match="nothing was killed"):
        kill_when_ready(lambda: False, lambda: False, lambda: kills.append("never"), timeout_s=0.05)
    assert kills == ["ready", "late"]


def failover_result(run, kill_at) -> dict:
    gaps = [b - a for stream in run for a, b in itertools.pairwise(stream)]
    return {
        "interrupted": interrupted(run, kill_at),
        "errors": 0,
        "max_gap_s": max(gaps),
        "tokens_per_s": 600.0,
        "streams": len(run),
        "tokens": 64,
    }


def test_the_routers_row_says_the_kill_landed_after_the_load_instead_of_a_gap():
    missed = routers.failover_row(1, failover_result(RUN, kill_at=2.0))
    assert AFTER_LOAD in missed and "gap" not in missed
    hit = routers.failover_row(1, failover_result(RUN, kill_at=1.2))
    assert AFTER_LOAD not in hit and "longest gap between two tokens of a stream 0.010s" in hit


def test_the_routers_failover_load_is_sized_from_the_measured_rate():
    rows = [(1, 8, {"tokens_per_s": 4000.0}), (1, 32, {"tokens_per_s": 8000.0})]
    assert routers.failover_load(rows, tokens=64) == (8, int(4000 / 8 * routers.FAILOVER_LOAD_S))
    assert routers.failover_load(rows, tokens=1800) == (8, 1800)  # never below --tokens
    assert routers.failover_load([(1, 8, {"tokens_per_s": 1e6})], 64) == (8, routers.MAX_TOKENS)


def test_the_failover_table_says_which_kills_missed(capsys):
    args = argparse.Namespace(workers=2, streams=8, tokens=200, kills=5, window_s=3.0)
    row = {"stalls": [0.4] * 5, "gaps": [0.5] * 5, "before": 100, "during": 50, "after": 100, "errors": 0}
    failover._print([("tiny", 1, {**row, "missed": 0}), ("tiny", 2, {**row, "missed": 2})], args)
    lines = capsys.readouterr().out.splitlines()
    assert AFTER_LOAD not in lines[2] and "0.500" in lines[2]
    assert f"{AFTER_LOAD} (2 of 5 kills)" in lines[3] and "0.500" not in lines[3]
