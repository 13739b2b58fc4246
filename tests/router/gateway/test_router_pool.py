"""The gateway's choice of router: ready ones only, the least loaded (running + waiting + streams sent since the
last poll, then KV usage), another than the one that just failed when there is one, and a bounded wait."""

from __future__ import annotations

import asyncio
import time

from router.gateway.router_pool import RouterPool
from router.request.messages import EngineStats


class View:
    def __init__(self, n):
        self.routers = [object() for _ in range(n)]


def pool_with(*loads) -> RouterPool:
    pool = RouterPool(View(len(loads)))
    for entry, (ready, running, waiting, used) in zip(pool.entries.values(), loads):
        entry.ready = ready
        entry.engine = EngineStats(running=running, waiting=waiting, kv_blocks_used=used, kv_blocks_total=100)
    return pool


def test_the_least_loaded_ready_router_is_chosen():
    pool = pool_with((True, 5, 0, 10), (True, 2, 1, 90), (False, 0, 0, 0))
    assert pool.choose().index == 1
    pool.entries[1].assigned = 4  # streams sent to it since the last poll count too
    assert pool.choose().index == 0


def test_kv_usage_breaks_ties():
    assert pool_with((True, 2, 0, 70), (True, 2, 0, 20)).choose().index == 1


def test_another_router_than_the_failed_one_when_there_is_one():
    pool = pool_with((True, 0, 0, 0), (True, 9, 9, 9))
    assert pool.choose(avoid=pool.entries[0]).index == 1
    single = pool_with((True, 0, 0, 0))
    assert single.choose(avoid=single.entries[0]).index == 0  # its replacement, once ready


def test_waiting_for_a_router_is_bounded_and_ends_when_one_is_ready():
    pool = pool_with((False, 0, 0, 0))
    started = time.monotonic()
    assert asyncio.run(pool.wait_for_one(time.monotonic() + 0.2)) is None
    assert time.monotonic() - started < 1.0

    async def ready_soon():
        await asyncio.sleep(0.1)
        pool.entries[0].ready = True

    async def wait():
        waiter = asyncio.create_task(pool.wait_for_one(time.monotonic() + 5))
        await ready_soon()
        return await waiter

    assert asyncio.run(wait()).index == 0


def test_a_replaced_handle_is_not_ready_until_polled():
    view = View(1)
    pool = RouterPool(view)
    pool.entries[0].ready = True
    view.routers = [object()]
    pool.refresh_handles()
    assert not pool.ready and "restarting" in pool.reason
