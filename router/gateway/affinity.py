"""Which router most likely holds a prompt's prefix in its KV cache, as this gateway sent it (no I/O, no Ray).

The gateway names a prompt's full blocks with the routers' own hashes (router/request/block_hash.py: the routers'
block size, the request's cache_salt and images) and remembers, for each hash, the routers it sent that block to
(an LRU of at most `capacity` hashes). A router's match for a prompt is the number of leading blocks it was sent.
The table is approximate, like SGLang's cache-aware router: a router may since have evicted a block; a replaced
router starts empty, so its entries are forgotten.

Policy (`pick`): among the candidates whose load is within the slack of the least loaded one, the one with the
longest match; ties go to the least loaded. A router far busier than the others loses its affinity, so one hot
prefix (a shared system prompt) does not pile every conversation onto one router.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
SLACK_ABS = 2  # sequences a router may have beyond the least loaded one, ...
SLACK_REL = 0.5  # ... or this fraction of the least loaded one's, whichever is more, and keep its affinity
ROUTE_BLOCKS = 256  # leading full blocks of a prompt hashed to route it (4,096 tokens with blocks of 16)
CAPACITY = 1 << 18  # block hashes remembered (each names one router's block of 16+ tokens)


def within_slack(load: float, least: float) -> bool:
    return load <= least + max(SLACK_ABS, SLACK_REL * least)


class Affinity:
    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self._routers: OrderedDict[bytes, set[int]] = OrderedDict()  # hash -> routers sent it, least recent first

    def __len__(self) -> int:
        return len(self._routers)

    def matches(self, hashes: Sequence[bytes]) -> dict[int, int]:
        """Router -> how many of the leading `hashes` it was sent (routers with none are absent)."""
        out: dict[int, int] = {}
        alive: set[int] | None = None
        for depth, key in enumerate(hashes):
            holders = self._routers.get(key, set())
            alive = set(holders) if alive is None else alive & holders
            if not alive:
                break
            for router in alive:
                out[router] = depth + 1
        return out

    def record(self, hashes: Sequence[bytes], router: int) -> None:
        """`router` was sent (or computed) these blocks: they are its most recent."""
        for key in hashes:
            holders = self._routers.pop(key, None) or set()
            holders.add(router)
            self._routers[key] = holders
        while len(self._routers) > self.capacity:
            self._routers.popitem(last=False)

    def forget(self, router: int) -> None:
        """A router restarted with an empty cache."""
        for key in [k for k, holders in self._routers.items() if router in holders]:
            holders = self._routers[key]
            holders.discard(router)
            if not holders:
                del self._routers[key]

    def pick(self, candidates: Sequence[T], index: Callable[[T], int], load: Callable[[T], tuple], hashes) -> T:
        """The candidate to send a prompt with these block hashes to (see the module's policy). `load(c)[0]`: its
        sequences, for the slack; the whole tuple breaks ties."""
        least = min(load(c)[0] for c in candidates)
        near = [c for c in candidates if within_slack(load(c)[0], least)]
        found = self.matches(hashes) if hashes else {}
        return min(near, key=lambda c: (-found.get(index(c), 0), *load(c), index(c)))
