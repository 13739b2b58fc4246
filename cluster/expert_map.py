"""The logical-to-physical expert map: which worker slots hold a copy of each expert of each MoE layer.

A worker *slot* is a position in the cluster (0..N-1), not an actor: when a worker dies, its replacement takes the
same slot and loads the same experts. An expert may have copies on several slots (replicas, for failover and for
hot experts), never two on one slot. Each slot holds its experts in a local order (ascending expert id), which is
the order rows arrive in and the order of its weight tensors. `generation` counts changes of the holdings (a
rebalance); a death or a replacement changes which slots are live, not the map.

Built once at start-up (`even`, or `from_spec` with explicit per-slot expert lists), recomputed by the rebalancer;
shared read-only by routers (to address rows) and workers (to know what to load). No torch here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


class PlacementError(ValueError):
    """A placement that cannot run; the message names the setting and says what to change."""


@dataclass(frozen=True)
class ExpertMap:
    num_workers: int  # slots 0..num_workers-1
    num_experts: int  # experts per MoE layer
    holdings: Mapping[int, tuple[tuple[int, ...], ...]]  # MoE layer -> per slot, its experts in local order
    generation: int = 0

    @classmethod
    def even(cls, num_experts: int, moe_layers: Sequence[int], num_workers: int, replicas: int = 1) -> ExpertMap:
        """Contiguous blocks (16 experts on 3 workers: 6, 5, 5), and with `replicas` R each block also on the
        next R-1 slots, so every expert has R copies on R different workers."""
        _check_worker_count(num_experts, num_workers)
        if not 1 <= replicas <= num_workers:
            raise PlacementError(
                f"cluster.expert_replicas: {replicas} copies of each expert need at least {replicas} workers (one "
                f"copy per worker); expected 1..{num_workers} with {num_workers} workers"
            )
        base, extra = divmod(num_experts, num_workers)
        primary: list[int] = []
        for w in range(num_workers):
            primary += [w] * (base + (1 if w < extra else 0))
        per_slot = [
            sorted(e for e, p in enumerate(primary) if (w - p) % num_workers < replicas) for w in range(num_workers)
        ]
        layout = tuple(tuple(experts) for experts in per_slot)
        return cls(num_workers, num_experts, {layer: layout for layer in moe_layers})

    @classmethod
    def from_spec(
        cls,
        spec: str | Sequence[Sequence[int]] | Mapping[int, Sequence[Sequence[int]]],
        num_experts: int,
        moe_layers: Sequence[int],
    ) -> ExpertMap:
        """`spec`: "0-7;8-15;0-3,8-11" (experts per worker, every layer; an expert listed on several workers has
        that many copies), a list of expert lists per worker, or a mapping layer -> list of expert lists."""
        if isinstance(spec, str):
            spec = [_parse_ranges(part) for part in spec.split(";")]
        per_layer = dict(spec) if isinstance(spec, Mapping) else {layer: spec for layer in moe_layers}
        missing = sorted(set(moe_layers) - set(per_layer))
        if missing or set(per_layer) - set(moe_layers):
            raise PlacementError(
                f"cluster.placement must cover exactly the MoE layers {list(moe_layers)}; "
                f"missing {missing}, extra {sorted(set(per_layer) - set(moe_layers))}"
            )
        counts = {len(groups) for groups in per_layer.values()}
        if len(counts) != 1:
            raise PlacementError(
                f"cluster.placement: every layer must be split over the same number of workers, got {sorted(counts)}"
            )
        num_workers = counts.pop()
        _check_worker_count(num_experts, num_workers)
        holdings = {int(layer): _holdings(layer, groups, num_experts) for layer, groups in per_layer.items()}
        return cls(num_workers, num_experts, holdings)

    @property
    def layers(self) -> list[int]:
        return sorted(self.holdings)

    def experts_of(self, slot: int, layer: int) -> tuple[int, ...]:
        return self.holdings[layer][slot]

    def copies(self, layer: int, expert: int) -> tuple[int, ...]:
        """The slots holding `expert` of `layer`."""
        return tuple(w for w, experts in enumerate(self.holdings[layer]) if expert in experts)

    def max_local_experts(self, layer: int) -> int:
        return max(len(experts) for experts in self.holdings[layer])

    def replicas(self) -> int:
        """The fewest copies any expert has."""
        return min(len(self.copies(layer, e)) for layer in self.holdings for e in range(self.num_experts))

    def uncovered(self, live: Iterable[int]) -> dict[int, list[int]]:
        """layer -> experts with no copy on a live slot (empty: the live slots can serve every token)."""
        live = set(live)
        out = {}
        for layer, per_slot in self.holdings.items():
            held = {e for w, experts in enumerate(per_slot) if w in live for e in experts}
            lost = [e for e in range(self.num_experts) if e not in held]
            if lost:
                out[layer] = lost
        return out

    def slot_experts(self, slot: int) -> dict[int, tuple[int, ...]]:
        """layer -> experts, for the worker in `slot` to load."""
        return {layer: per_slot[slot] for layer, per_slot in self.holdings.items()}

    def describe(self) -> dict[int, dict[int, list[int]]]:
        """slot -> layer -> experts, for status displays."""
        return {w: {layer: list(self.holdings[layer][w]) for layer in self.layers} for w in range(self.num_workers)}

    def successor(self, holdings: Mapping[int, Sequence[Sequence[int]]]) -> ExpertMap:
        """The next generation with new holdings (validated like a spec)."""
        checked = {layer: _holdings(layer, holdings[layer], self.num_experts) for layer in self.layers}
        if {len(per_slot) for per_slot in checked.values()} != {self.num_workers}:
            raise PlacementError(f"a new map must keep the {self.num_workers} worker slots")
        return ExpertMap(self.num_workers, self.num_experts, checked, self.generation + 1)


def _check_worker_count(num_experts: int, num_workers: int) -> None:
    if num_workers < 1:
        raise PlacementError(
            f"cluster.workers: need at least one expert worker, got {num_workers} (0 runs the experts in-process)"
        )
    if num_workers > num_experts:
        raise PlacementError(
            f"cluster.workers: {num_workers} workers is more than the {num_experts} experts per layer: "
            f"every worker must hold at least one expert; use at most {num_experts} workers"
        )


def _parse_ranges(text: str) -> list[int]:
    experts: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-"))
                experts += list(range(a, b + 1))
            elif part:
                experts.append(int(part))
        except ValueError:
            raise PlacementError(
                f"cluster.placement: cannot read {part!r}; write experts like '0-5,8;6,7,9-15' (workers separated "
                "by ';')"
            ) from None
    return experts


def _holdings(layer: int, groups: Sequence[Sequence[int]], num_experts: int) -> tuple[tuple[int, ...], ...]:
    held: set[int] = set()
    per_slot = []
    for w, experts in enumerate(groups):
        if not experts:
            raise PlacementError(
                f"layer {layer}: worker {w} holds no expert; give it at least one or use fewer workers"
            )
        for e in experts:
            if not 0 <= e < num_experts:
                raise PlacementError(f"layer {layer}: expert {e} does not exist (experts are 0..{num_experts - 1})")
        twice = sorted({e for e in experts if list(experts).count(e) > 1})
        if twice:
            raise PlacementError(
                f"layer {layer}: worker {w} lists experts {twice} twice; a worker holds at most one copy of an expert"
            )
        held |= set(experts)
        per_slot.append(tuple(sorted(experts)))
    lost = [e for e in range(num_experts) if e not in held]
    if lost:
        raise PlacementError(f"layer {layer}: experts {lost} have no worker; every expert needs at least one copy")
    return tuple(per_slot)
