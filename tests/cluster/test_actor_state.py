"""The actors' vocabulary survives the trip through Ray's pickling with its identity (an enum member compares with
`is` on the other side), and the reports' small helpers count as their readers expect."""

from __future__ import annotations

import pickle

from cluster.actor_reports import STALL_BUCKETS_S, ChannelStats, MemberStatus, SupervisorCounters, SupervisorStatus
from cluster.actor_state import FENCED, REGROUPED, STOPPED, ActorKind, ChannelState, LoopEnd, LoopEndKind, MemberState


def test_loop_ends_and_states_pickle_to_the_same_members():
    end = pickle.loads(pickle.dumps(LoopEnd(LoopEndKind.FAILED, "expert worker 1 failed: boom")))
    assert end.kind is LoopEndKind.FAILED and end.describe() == "expert worker 1 failed: boom" and not end.alive
    assert pickle.loads(pickle.dumps(MemberState.JOINING)) is MemberState.JOINING
    assert pickle.loads(pickle.dumps(FENCED)) == FENCED


def test_only_a_worker_that_stopped_regrouped_or_was_fenced_is_alive():
    assert all(end.alive for end in (STOPPED, REGROUPED, FENCED))
    assert not any(LoopEnd(kind).alive for kind in (LoopEndKind.DEAD, LoopEndKind.FAILED))
    assert LoopEnd(LoopEndKind.DEAD).describe() == "dead"  # no reason given: the kind names it


def test_a_channel_takes_requests_while_serving_or_in_a_failover_only():
    takes = {state for state in ChannelState if state.takes_requests}
    assert takes == {ChannelState.SERVING, ChannelState.RECOVERING, ChannelState.HOLDING}


def test_each_stall_lands_in_its_bucket_and_the_latest_are_kept():
    stats = ChannelStats()
    for stall in (0.05, 0.3, 0.3, 500.0):
        stats = stats.with_stall(stall)
    assert stats.failovers == 4 and stats.stalls_s == (0.05, 0.3, 0.3, 500.0)
    assert stats.stall_buckets[0] == 1 and stats.stall_buckets[2] == 2 and stats.stall_buckets[-1] == 1
    assert len(stats.stall_buckets) == len(STALL_BUCKETS_S) + 1 and sum(stats.stall_buckets) == 4
    assert abs(stats.stall_sum_s - 500.65) < 1e-9


def test_the_supervisors_status_by_kind_and_deaths_by_kind():
    status = SupervisorStatus(
        slots=(MemberStatus(0), MemberStatus(1, MemberState.LOADING, replacements=1)),
        encoders=(MemberStatus(0, MemberState.DEAD),),
        counters=SupervisorCounters(deaths={ActorKind.WORKER: 2}),
    )
    assert status.of(ActorKind.WORKER)[1].state is MemberState.LOADING and status.of(ActorKind.ROUTER) == {}
    assert status.counters.died(ActorKind.WORKER) == 2 and status.counters.died(ActorKind.ENCODER) == 0
    assert ActorKind.WORKER.title == "expert worker" and ActorKind.ROUTER.title == "router"
