"""A shard of one MoE layer's routed experts, and their grouped compute.

Whoever holds experts (the router in-process, or an expert worker) holds an `ExpertShard` per MoE layer. Rows
arrive already multiplied by their gate (Llama 4 gates the expert input), each tagged with a local expert
index; only experts that received rows run.

Legend: R rows, D hidden, I expert width, E local experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ExpertShard:
    experts: tuple[int, ...]  # global expert ids, in local-index order
    gate_up_EDI2: torch.Tensor  # [E, D, 2I], used as x @ W (checkpoint layout): gate = first I, up = last I
    down_EID: torch.Tensor  # [E, I, D]

    @property
    def nbytes(self) -> int:
        return self.gate_up_EDI2.nbytes + self.down_EID.nbytes

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ExpertShard":
        return ExpertShard(self.experts, self.gate_up_EDI2.to(device, dtype), self.down_EID.to(device, dtype))

    def forward(self, x_RD: torch.Tensor, local_R: torch.Tensor) -> torch.Tensor:
        """y[r] = Expert_{local[r]}(x[r]); rows may come in any order."""
        order_R = torch.argsort(local_R, stable=True)
        counts = torch.bincount(local_R, minlength=len(self.experts)).tolist()
        y_sorted_RD = expert_segments(x_RD[order_R], counts, self.gate_up_EDI2, self.down_EID)
        y_RD = torch.empty_like(y_sorted_RD)
        y_RD[order_R] = y_sorted_RD
        return y_RD

    def forward_sorted(self, x_RD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows already grouped by local expert, counts[e] rows for expert e (the transport sends them so)."""
        return expert_segments(x_RD, counts, self.gate_up_EDI2, self.down_EID)


def expert_segments(x_RD: torch.Tensor, counts: list[int], gate_up_EDI2, down_EID) -> torch.Tensor:
    y_RD = torch.empty_like(x_RD)
    width = down_EID.shape[1]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        xs = x_RD[start : start + n]
        gate_up = xs @ gate_up_EDI2[e]
        y_RD[start : start + n] = (gate_up[:, width:] * F.silu(gate_up[:, :width])) @ down_EID[e]
        start += n
    return y_RD
