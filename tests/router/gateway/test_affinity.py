"""Cache-affinity routing in the gateway (no Ray): a router's match is the run of a prompt's leading blocks it was
sent; the longest match wins among routers within the load slack; a far busier router loses its affinity; a
replaced router's entries are forgotten; a failover's re-prefill goes where the prefix is."""

from __future__ import annotations

import asyncio
import time

from router.gateway.affinity import SLACK_ABS, Affinity
from router.gateway.router_pool import RouterPool
from router.request.block_hash import prompt_block_hashes
from router.request.messages import EngineStats

SYSTEM = list(range(100, 164))  # 4 blocks of 16 shared by every conversation


def hashes(ids):
    return prompt_block_hashes(ids, 16, None)


def conversation(user: int, turns: int = 1):
    return SYSTEM + [user] * 16 * turns


class View:
    def __init__(self, n):
        self.routers = [object() for _ in range(n)]


def pool_of(n: int, running=None) -> RouterPool:
    pool = RouterPool(View(n), Affinity())
    for entry, r in zip(pool.entries.values(), running or [0] * n):
        entry.ready = True
        entry.engine = EngineStats(running=r, kv_blocks_total=100)
    return pool


def test_a_match_is_the_run_of_leading_blocks_a_router_was_sent():
    a = Affinity()
    a.record(hashes(conversation(1, 2)), 0)
    a.record(hashes(conversation(2)), 1)
    assert a.matches(hashes(conversation(1, 3))) == {0: 6, 1: 4}  # both have the system prompt; 0 has turn 2 too
    assert a.matches(hashes([7] * 64)) == {}


def test_the_table_is_bounded_least_recent_first():
    a = Affinity(capacity=4)
    a.record(hashes(conversation(1, 2)), 0)  # 6 blocks: the system prompt's first 2 fall out
    assert len(a) == 4 and a.matches(hashes(conversation(1, 2))) == {}


def test_the_turns_of_a_conversation_follow_its_router():
    pool = pool_of(2, running=[SLACK_ABS, 0])  # router 0 is a little busier, within the slack
    pool.sent(pool.entries[0], hashes(conversation(1)))
    assert pool.choose(hashes=hashes(conversation(1, 2))).index == 0
    assert pool.choose(hashes=hashes([9] * 64)).index == 1  # no match anywhere: the least loaded


def test_a_far_busier_router_loses_its_affinity():
    pool = pool_of(2, running=[SLACK_ABS + 1, 0])
    pool.sent(pool.entries[0], hashes(conversation(1)))
    assert pool.choose(hashes=hashes(conversation(1, 2))).index == 1


def test_conversations_spread_once_both_routers_hold_the_shared_prompt():
    pool = pool_of(2)
    chosen = []
    for user in range(16):  # each stream stays open (counted as load) while the next arrives
        h = hashes(conversation(user))
        entry = pool.choose(hashes=h)
        entry.assigned += 1
        pool.sent(entry, h)
        chosen.append(entry.index)
    assert abs(chosen.count(0) - chosen.count(1)) <= 1, chosen
    for user in range(16):  # the next turns: each to its own router (the loads are unchanged)
        assert pool.choose(hashes=hashes(conversation(user, 2))).index == chosen[user]


def test_a_replaced_router_starts_with_no_affinity():
    pool = pool_of(2, running=[1, 0])
    pool.sent(pool.entries[0], hashes(conversation(1)))
    pool.view.routers[0] = object()  # its replacement
    pool.refresh_handles()
    pool.entries[0].ready = True
    assert pool.affinity.matches(hashes(conversation(1))) == {}


def test_a_failover_goes_where_the_prefix_is():
    pool = pool_of(3, running=[0, 2, 0])
    pool.sent(pool.entries[1], hashes(conversation(1)))
    got = asyncio.run(pool.wait_for_one(time.monotonic() + 1, avoid=pool.entries[0], hashes=hashes(conversation(1))))
    assert got.index == 1


def test_without_affinity_the_least_loaded_router_is_chosen_whatever_it_holds():
    pool = RouterPool(View(2))
    for entry, r in zip(pool.entries.values(), [2, 0]):
        entry.ready, entry.engine = True, EngineStats(running=r)
    pool.sent(pool.entries[0], hashes(conversation(1)))
    assert pool.choose(hashes=hashes(conversation(1))).index == 1
