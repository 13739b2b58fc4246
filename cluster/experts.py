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

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ExpertShard:
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

    def forward_padded(self, x_CD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows grouped by local expert, counts_E[e] of them for expert e (a device tensor), then padding up to C.
        Outputs [C, D]: the real rows' results, anything in the padding rows. Each expert's matmul has exactly its
        own rows, as in `forward_sorted` (bit-identical on CPU, tested). With torch._grouped_mm (CPU; CUDA where
        the shapes are aligned) the offsets stay on the device: no host sync; otherwise the counts are read."""
        if grouped_mm_supported(x_CD, self.gate_up_EDI2, self.down_EID):
            offs_E = counts_E.cumsum(0, dtype=torch.int32)
            return _grouped_offsets(x_CD, offs_E, self.gate_up_EDI2, self.down_EID)
        counts = counts_E.tolist()
        y_CD = torch.empty_like(x_CD)
        y_CD[: sum(counts)] = expert_segments(x_CD[: sum(counts)], counts, self.gate_up_EDI2, self.down_EID)
        return y_CD


def expert_segments(
    x_RD: torch.Tensor, counts: list[int], gate_up_EDI2, down_EID, grouped: bool | None = None
) -> torch.Tensor:
    """Rows grouped by expert (counts[e] rows for expert e) through their experts. `grouped=None` picks
    torch._grouped_mm on CUDA for 32..2048 rows, where it measured 2-7% faster at Scout's shape on an H100
    (`moecluster bench moe-layer`), and the per-expert loop otherwise (faster for decode-sized batches)."""
    num_experts = gate_up_EDI2.shape[0]
    assert not any(counts[num_experts:]), "rows for experts this shard does not hold"
    counts = list(counts[:num_experts]) + [0] * (num_experts - len(counts))
    if grouped is None:
        grouped = x_RD.is_cuda and 32 <= x_RD.shape[0] <= 2048 and grouped_mm_supported(x_RD, gate_up_EDI2, down_EID)
    if grouped and x_RD.shape[0]:
        return _grouped(x_RD, counts, gate_up_EDI2, down_EID)
    return _per_expert_loop(x_RD, counts, gate_up_EDI2, down_EID)


def grouped_mm_supported(x_RD, gate_up_EDI2, down_EID) -> bool:
    """torch._grouped_mm needs 16-byte aligned rows (all Llama 4 shapes are)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    row_bytes = x_RD.element_size()
    return all((n * row_bytes) % 16 == 0 for n in (gate_up_EDI2.shape[1], gate_up_EDI2.shape[2], down_EID.shape[1]))


def _grouped(x_RD, counts, gate_up_EDI2, down_EID) -> torch.Tensor:
    offs_E = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x_RD.device)  # end rows
    return _grouped_offsets(x_RD, offs_E, gate_up_EDI2, down_EID)


def _grouped_offsets(x_RD, offs_E, gate_up_EDI2, down_EID) -> torch.Tensor:
    """Rows past offs_E[-1] are not multiplied; their outputs are unspecified."""
    width = down_EID.shape[1]
    gate_up_RI2 = torch._grouped_mm(x_RD, gate_up_EDI2, offs=offs_E)
    act_RI = gate_up_RI2[:, width:] * F.silu(gate_up_RI2[:, :width])
    return torch._grouped_mm(act_RI, down_EID, offs=offs_E)


def _per_expert_loop(x_RD, counts, gate_up_EDI2, down_EID) -> torch.Tensor:
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
