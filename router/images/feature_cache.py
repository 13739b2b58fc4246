"""Recently encoded images' features by content hash, least recently used first out, within a byte budget. Serves
an image sent again (a chat whose history repeats its images, or a request resumed on this router) without
encoding it again. Bookkeeping only: it keeps whatever tensors it is given and never computes with them."""

from __future__ import annotations

from collections import OrderedDict


class FeatureCache:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.bytes = 0
        self._items: OrderedDict[bytes, object] = OrderedDict()  # digest -> features tensor
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes):
        features = self._items.get(key)
        if features is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return features

    def put(self, key: bytes, features) -> None:
        """Keep it (evicting the least recently used); a tensor larger than the whole budget is not kept."""
        size = _nbytes(features)
        if size > self.budget or key in self._items:
            return
        while self.bytes + size > self.budget:
            _, old = self._items.popitem(last=False)
            self.bytes -= _nbytes(old)
        self._items[key] = features
        self.bytes += size


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()
