"""The expert weights one worker holds, per map generation, and the routed-token counts of each copy.

A generation's shards are the slot's experts of each MoE layer stacked in local order (the order rows arrive
in). A new generation (a rebalance) reuses the experts the worker already holds and reads only the new ones from
the checkpoint; the old generation stays until every router has switched, then `retire` frees it.

Legend: E local experts, D hidden, I expert width.
"""

from __future__ import annotations

import threading

import torch

from cluster.checkpoint import CheckpointReader
from cluster.config import ModelConfig
from cluster.expert_map import ExpertMap
from cluster.experts import ExpertShard, gather
from cluster.weights import load_expert_shard


class ExpertStore:
    def __init__(
        self,
        cfg: ModelConfig,
        reader: CheckpointReader,
        slot: int,
        device: torch.device,
        dtype: torch.dtype,
        expert_dtype: str = "auto",
    ):
        """`dtype`: the activations'; `expert_dtype`: how experts are held (cluster/weights.py)."""
        self.cfg, self.reader, self.slot, self.device, self.dtype = cfg, reader, slot, device, dtype
        self.expert_dtype = expert_dtype
        self.maps: dict[int, ExpertMap] = {}
        self.shards: dict[int, dict[int, ExpertShard]] = {}  # generation -> layer -> shard
        # routed tokens per (layer, global expert) since this worker started, on the device (no sync per layer)
        self.tokens = {
            layer: torch.zeros(cfg.num_local_experts, dtype=torch.int64, device=device) for layer in cfg.moe_layers
        }
        self._ids = {}  # (generation, layer) -> global expert ids of the local order, on the device
        self._lock = threading.Lock()

    def load(self, expert_map: ExpertMap) -> None:
        """Hold `expert_map`'s experts for this slot, reading from the checkpoint only what no held generation
        has. Safe to call while steps of other generations are being served."""
        shards = {}
        for layer, experts in expert_map.slot_experts(self.slot).items():
            shards[layer] = self._assemble(layer, experts)
        with self._lock:
            self.maps[expert_map.generation] = expert_map
            self.shards[expert_map.generation] = shards
            for layer, experts in expert_map.slot_experts(self.slot).items():
                self._ids[(expert_map.generation, layer)] = torch.tensor(experts, device=self.device)

    def retire(self, keep: int) -> None:
        """Free every generation older than `keep`."""
        with self._lock:
            for generation in [g for g in self.shards if g < keep]:
                del self.shards[generation], self.maps[generation]
                for key in [k for k in self._ids if k[0] == generation]:
                    del self._ids[key]

    def generation(self, generation: int) -> tuple[ExpertMap, dict[int, ExpertShard]]:
        with self._lock:
            if generation not in self.shards:
                raise RuntimeError(
                    f"worker slot {self.slot}: a step of map generation {generation} arrived, but "
                    f"this worker holds generations {sorted(self.shards)}"
                )
            return self.maps[generation], self.shards[generation]

    def count(self, generation: int, layer: int, per_local_E: torch.Tensor) -> None:
        ids = self._ids[(generation, layer)]
        with self._lock:
            self.tokens[layer].index_add_(0, ids, per_local_E[: len(ids)])

    @property
    def latest(self) -> int:
        return max(self.shards)

    @property
    def bytes_resident(self) -> int:
        seen = {}
        for shards in self.shards.values():
            for shard in shards.values():
                seen[id(shard.gate_up_EDI2)] = shard.nbytes
        return sum(seen.values())

    @property
    def weight_dtype(self) -> str:
        """What the held experts' weights are: "fp8", "bfloat16", ... ("" before loading)."""
        with self._lock:
            shards = [s for generation in self.shards.values() for s in generation.values()]
        return shards[0].weight_dtype if shards else ""

    def holdings(self) -> dict[int, list[int]]:
        """layer -> experts of the newest generation."""
        with self._lock:
            return {layer: list(s.experts) for layer, s in self.shards[self.latest].items()}

    def token_counts(self) -> dict[int, dict[int, int]]:
        """layer -> {expert: tokens} for the experts of the newest generation."""
        with self._lock:
            counts = {layer: t.tolist() for layer, t in self.tokens.items()}
            held = {layer: list(s.experts) for layer, s in self.shards[self.latest].items()}
        return {layer: {e: counts[layer][e] for e in experts} for layer, experts in held.items()}

    def _assemble(self, layer: int, experts: tuple[int, ...]) -> ExpertShard:
        with self._lock:
            held = [s[layer] for s in self.shards.values()]
        for shard in held:
            if shard.experts == experts:
                return shard  # the same experts in the same order: share the tensors
        have = {e: (shard, i) for shard in held for i, e in enumerate(shard.experts)}
        new = [e for e in experts if e not in have]
        loaded = None
        if new:
            loaded = load_expert_shard(self.cfg, self.reader, layer, new, self.device, self.dtype, self.expert_dtype)
        if loaded is not None and loaded.experts == experts:
            return loaded  # nothing held yet: the shard as read
        source = {**have, **({e: (loaded, i) for i, e in enumerate(new)} if loaded else {})}
        return gather(experts, [source[e] for e in experts])
