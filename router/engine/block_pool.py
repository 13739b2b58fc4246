"""One pool of physical KV blocks (no torch), with prefix caching: reference counts, a hash -> block map of the
blocks whose content is known, and an LRU of cached blocks that no sequence uses.

A block is in exactly one of three states:
  - free: no content anyone can name; taken first;
  - held: `refs` > 0 sequences use it (cached or not); never evicted;
  - cached and unused: refs 0 but named by a hash; kept for a later hit, evicted oldest first when room is needed.
`num_free` counts free and cached-unused blocks: both are room for a new sequence.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = deque(range(num_blocks))
        self._unused: OrderedDict[int, bytes] = OrderedDict()  # cached, refs 0: block -> hash, oldest first
        self.refs = [0] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block
        self._hash_of: dict[int, bytes] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._unused)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def take(self, n: int) -> list[int]:
        """`n` blocks for new content: free ones first, then the least recently used cached ones (evicted)."""
        assert n <= self.num_free, (n, self.num_free)
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, key = self._unused.popitem(last=False)
                del self.cached[key], self._hash_of[block]
                self.evictions += 1
            self.refs[block] = 1
            out.append(block)
        return out

    def give_back(self, ids) -> None:
        """Drop one reference to each block; a block nobody holds becomes free, or cached-unused (most recently used
        last) if a hash names it."""
        for block in ids:
            assert self.refs[block] > 0, block
            self.refs[block] -= 1
            if self.refs[block]:
                continue
            key = self._hash_of.get(block)
            if key is None:
                self._free.append(block)
            else:
                self._unused[block] = key

    def lookup(self, key: bytes) -> int | None:
        return self.cached.get(key)

    def acquire(self, block: int) -> None:
        """One more reference to a cached block (a hit): it leaves the LRU if nobody held it."""
        if self.refs[block] == 0:
            del self._unused[block]
        self.refs[block] += 1

    def register(self, block: int, key: bytes) -> None:
        """Name a held block whose content is now complete. A hash already naming another block keeps that one (two
        sequences computed the same block at once): this block stays unnamed and is freed as usual."""
        assert self.refs[block] > 0, block
        if key not in self.cached and block not in self._hash_of:
            self.cached[key], self._hash_of[block] = block, key
