"""A simple contiguous KV cache: per (layer, slot) one growing buffer of every position.

Used by single-process generation and as the reference the paged cache is checked against. Chunked layers
still store everything here; the attention math only reads from the current chunk on.
Legend: S positions, K kv heads, Dh head_dim.
"""

from __future__ import annotations

import torch

from cluster.batch import SeqSlice


class ContiguousKVCache:
    def __init__(self, initial_capacity: int = 256):
        self.initial_capacity = initial_capacity
        self._k: dict[tuple[int, int], torch.Tensor] = {}
        self._v: dict[tuple[int, int], torch.Tensor] = {}

    def store_and_load(self, layer: int, seq: SeqSlice, k_tKD: torch.Tensor, v_tKD: torch.Tensor, lo: int):
        key, end = (layer, seq.slot), seq.pos0 + seq.length
        k_SKD, v_SKD = self._ensure(key, end, k_tKD)
        k_SKD[seq.pos0 : end] = k_tKD
        v_SKD[seq.pos0 : end] = v_tKD
        return k_SKD[lo:end], v_SKD[lo:end]

    def free(self, slot: int) -> None:
        for key in [k for k in self._k if k[1] == slot]:
            del self._k[key], self._v[key]

    def _ensure(self, key, end: int, like: torch.Tensor):
        k = self._k.get(key)
        if k is None or k.shape[0] < end:
            capacity = max(end, self.initial_capacity, 2 * (0 if k is None else k.shape[0]))
            new_k = like.new_empty((capacity, *like.shape[1:]))
            new_v = like.new_empty((capacity, *like.shape[1:]))
            if k is not None:
                new_k[: k.shape[0]] = k
                new_v[: k.shape[0]] = self._v[key]
            self._k[key], self._v[key] = new_k, new_v
        return self._k[key], self._v[key]
