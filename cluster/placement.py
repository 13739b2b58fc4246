"""Which expert worker owns each expert of each MoE layer.

Built once at start-up (from `--workers N`, an explicit per-worker spec, or a per-layer mapping), validated,
then shared read-only by the router (to address rows) and each worker (to know what to load). Each expert of
each MoE layer has exactly one owner; uneven splits (16 experts on 3 workers) are normal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


class PlacementError(ValueError):
    """A placement that cannot run; the message says what to change."""


@dataclass(frozen=True)
class ExpertPlacement:
    num_workers: int
    num_experts: int
    owners: dict[int, tuple[int, ...]]  # MoE layer -> owner worker index of each global expert

    @classmethod
    def even(cls, num_experts: int, moe_layers: Sequence[int], num_workers: int) -> ExpertPlacement:
        """Contiguous blocks, sizes differing by at most one: 16 experts on 3 workers -> 6, 5, 5."""
        _check_worker_count(num_experts, num_workers)
        base, extra = divmod(num_experts, num_workers)
        owner: list[int] = []
        for w in range(num_workers):
            owner += [w] * (base + (1 if w < extra else 0))
        return cls(num_workers, num_experts, {layer: tuple(owner) for layer in moe_layers})

    @classmethod
    def from_spec(
        cls,
        spec: str | Sequence[Sequence[int]] | Mapping[int, Sequence[Sequence[int]]],
        num_experts: int,
        moe_layers: Sequence[int],
    ) -> ExpertPlacement:
        """`spec`: "0-5;6-10;11-15" (per worker, every layer), a list of expert lists per worker, or a mapping
        layer -> list of expert lists per worker."""
        if isinstance(spec, str):
            spec = [_parse_ranges(part) for part in spec.split(";")]
        per_layer = dict(spec) if isinstance(spec, Mapping) else {layer: spec for layer in moe_layers}
        missing = sorted(set(moe_layers) - set(per_layer))
        if missing or set(per_layer) - set(moe_layers):
            raise PlacementError(
                f"placement must cover exactly the MoE layers {list(moe_layers)}; "
                f"missing {missing}, extra {sorted(set(per_layer) - set(moe_layers))}"
            )
        counts = {len(groups) for groups in per_layer.values()}
        if len(counts) != 1:
            raise PlacementError(f"every layer must be split over the same number of workers, got {sorted(counts)}")
        num_workers = counts.pop()
        _check_worker_count(num_experts, num_workers)
        owners = {int(layer): _owners(layer, groups, num_experts) for layer, groups in per_layer.items()}
        return cls(num_workers, num_experts, owners)

    def experts_of(self, worker: int, layer: int) -> tuple[int, ...]:
        return tuple(e for e, w in enumerate(self.owners[layer]) if w == worker)

    def max_local_experts(self, layer: int) -> int:
        return max(len(self.experts_of(w, layer)) for w in range(self.num_workers))

    def routing_tables(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """owner_E (worker index) and local_E (index of the expert within its owner's shard)."""
        owner = self.owners[layer]
        seen = [0] * self.num_workers
        local = []
        for w in owner:
            local.append(seen[w])
            seen[w] += 1
        return torch.tensor(owner, device=device), torch.tensor(local, device=device)

    def describe(self) -> dict[int, dict[int, list[int]]]:
        """worker -> layer -> experts, for status displays."""
        return {w: {layer: list(self.experts_of(w, layer)) for layer in self.owners} for w in range(self.num_workers)}


def _check_worker_count(num_experts: int, num_workers: int) -> None:
    if num_workers < 1:
        raise PlacementError(
            f"need at least one expert worker, got {num_workers} (use --workers 0 for in-process experts)"
        )
    if num_workers > num_experts:
        raise PlacementError(
            f"{num_workers} workers is more than the {num_experts} experts per layer: "
            f"every worker must own at least one expert; use at most {num_experts} workers"
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
                f"placement: cannot read {part!r}; write experts like '0-5,8;6,7,9-15' (workers separated by ';')"
            ) from None
    return experts


def _owners(layer: int, groups: Sequence[Sequence[int]], num_experts: int) -> tuple[int, ...]:
    owner = [-1] * num_experts
    for w, experts in enumerate(groups):
        if not experts:
            raise PlacementError(f"layer {layer}: worker {w} owns no expert; give it at least one or use fewer workers")
        for e in experts:
            if not 0 <= e < num_experts:
                raise PlacementError(f"layer {layer}: expert {e} does not exist (experts are 0..{num_experts - 1})")
            if owner[e] != -1:
                raise PlacementError(f"layer {layer}: expert {e} is given to both worker {owner[e]} and worker {w}")
            owner[e] = w
    unowned = [e for e, w in enumerate(owner) if w == -1]
    if unowned:
        raise PlacementError(f"layer {layer}: experts {unowned} have no worker; every expert needs exactly one owner")
    return tuple(owner)
