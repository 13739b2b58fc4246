"""A shard of one MoE layer's routed experts, and their grouped compute.

Whoever holds experts (the router in-process, or an expert worker) holds an `ExpertShard` per MoE layer. Rows
arrive already multiplied by their gate (Llama 4 gates the expert input), each tagged with a local expert
index; only experts that received rows run.

FP8 shards (cluster/fp8.py) hold float8_e4m3fn weights as transposed views of their `[out, in]` storage (the same
`[E, D, 2I]` / `[E, I, D]` shapes, column-major) with fp32 scales per output column; `is_fp8` tells them apart.

Legend: R rows, D hidden, I expert width, E local experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cluster.fp8 import dequantize_columns, fp8_grouped, fp8_grouped_supported


@dataclass
class ExpertShard:
    experts: tuple[int, ...]  # global expert ids, in local-index order
    gate_up_EDI2: torch.Tensor  # [E, D, 2I], used as x @ W (checkpoint layout): gate = first I, up = last I
    down_EID: torch.Tensor  # [E, I, D]
    gate_up_scale_EI2: torch.Tensor | None = None  # FP8 only: fp32 scale of each gate/up output column
    down_scale_ED: torch.Tensor | None = None  # FP8 only: fp32 scale of each down output column

    @property
    def is_fp8(self) -> bool:
        return self.gate_up_scale_EI2 is not None

    @property
    def weight_dtype(self) -> str:
        """What the weights are held in: "fp8" or the float dtype's name (e.g. "bfloat16")."""
        return "fp8" if self.is_fp8 else str(self.gate_up_EDI2.dtype).replace("torch.", "")

    @property
    def nbytes(self) -> int:
        scales = self.gate_up_scale_EI2.nbytes + self.down_scale_ED.nbytes if self.is_fp8 else 0
        return self.gate_up_EDI2.nbytes + self.down_EID.nbytes + scales

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ExpertShard:
        """On `device`; `dtype` converts float weights only (FP8 weights keep their bytes, layout and scales)."""
        if self.is_fp8:
            move = lambda t: t.to(device)  # noqa: E731 (preserve_format keeps the column-major views)
            return ExpertShard(
                self.experts, *map(move, (self.gate_up_EDI2, self.down_EID, self.gate_up_scale_EI2, self.down_scale_ED))
            )
        return ExpertShard(self.experts, self.gate_up_EDI2.to(device, dtype), self.down_EID.to(device, dtype))

    def pick(self, index: int) -> tuple[torch.Tensor, ...]:
        """Local expert `index`'s tensors, in field order (for `gather`)."""
        fields = (self.gate_up_EDI2, self.down_EID, self.gate_up_scale_EI2, self.down_scale_ED)
        return tuple(t[index] for t in fields if t is not None)

    @property
    def scales(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.gate_up_scale_EI2, self.down_scale_ED) if self.is_fp8 else None

    def forward(self, x_RD: torch.Tensor, local_R: torch.Tensor) -> torch.Tensor:
        """y[r] = Expert_{local[r]}(x[r]); rows may come in any order."""
        order_R = torch.argsort(local_R, stable=True)
        counts = torch.bincount(local_R, minlength=len(self.experts)).tolist()
        y_sorted_RD = expert_segments(x_RD[order_R], counts, self.gate_up_EDI2, self.down_EID, scales=self.scales)
        y_RD = torch.empty_like(y_sorted_RD)
        y_RD[order_R] = y_sorted_RD
        return y_RD

    def forward_sorted(self, x_RD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows already grouped by local expert, counts[e] rows for expert e (the transport sends them so)."""
        return expert_segments(x_RD, counts, self.gate_up_EDI2, self.down_EID, scales=self.scales)

    def forward_padded(self, x_CD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows grouped by local expert, counts_E[e] of them for expert e (a device tensor), then padding up to C.
        Outputs [C, D]: the real rows' results, anything in the padding rows. Each expert's matmul has exactly its
        own rows, as in `forward_sorted` (bit-identical on CPU, tested). With torch._grouped_mm (CPU; CUDA where
        the shapes are aligned) the offsets stay on the device: no host sync; otherwise the counts are read."""
        if self.is_fp8 and fp8_grouped_supported(x_CD, self.gate_up_EDI2, self.down_EID):
            offs_E = counts_E.cumsum(0, dtype=torch.int32)
            return fp8_grouped(x_CD, offs_E, self.gate_up_EDI2, self.down_EID, *self.scales)
        if not self.is_fp8 and grouped_mm_supported(x_CD, self.gate_up_EDI2, self.down_EID):
            offs_E = counts_E.cumsum(0, dtype=torch.int32)
            return _grouped_offsets(x_CD, offs_E, self.gate_up_EDI2, self.down_EID)
        counts = counts_E.tolist()
        y_CD = torch.empty_like(x_CD)
        y_CD[: sum(counts)] = expert_segments(
            x_CD[: sum(counts)], counts, self.gate_up_EDI2, self.down_EID, scales=self.scales
        )
        return y_CD


def gather(experts: tuple[int, ...], parts: list[tuple[ExpertShard, int]]) -> ExpertShard:
    """A shard of `experts` from (shard, local index) of each, in order; FP8 parts keep their column-major layout."""
    picked = [shard.pick(i) for shard, i in parts]
    if not parts[0][0].is_fp8:
        return ExpertShard(experts, *(torch.stack(ts) for ts in zip(*picked)))
    gate_up_EI2D = torch.stack([p[0].T for p in picked])  # the [out, in] storage, contiguous
    down_EDI = torch.stack([p[1].T for p in picked])
    gate_up_scale, down_scale = torch.stack([p[2] for p in picked]), torch.stack([p[3] for p in picked])
    return ExpertShard(experts, gate_up_EI2D.transpose(1, 2), down_EDI.transpose(1, 2), gate_up_scale, down_scale)


def expert_segments(
    x_RD: torch.Tensor, counts: list[int], gate_up_EDI2, down_EID, grouped: bool | None = None, scales=None
) -> torch.Tensor:
    """Rows grouped by expert (counts[e] rows for expert e) through their experts. `grouped=None` picks
    torch._grouped_mm on CUDA for 32..2048 rows, where it measured 2-7% faster at Scout's shape on an H100
    (`moecluster bench moe-layer`), and the per-expert loop otherwise (faster for decode-sized batches).
    `scales` (gate_up [E, 2I], down [E, D]): the weights are FP8 (cluster/fp8.py)."""
    num_experts = gate_up_EDI2.shape[0]
    assert not any(counts[num_experts:]), "rows for experts this shard does not hold"
    counts = list(counts[:num_experts]) + [0] * (num_experts - len(counts))
    if scales is not None:
        return _fp8_segments(x_RD, counts, gate_up_EDI2, down_EID, scales, grouped)
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


def _fp8_segments(x_RD, counts, gate_up_EDI2, down_EID, scales, grouped) -> torch.Tensor:
    if grouped is None:
        grouped = fp8_grouped_supported(x_RD, gate_up_EDI2, down_EID)
    if grouped and x_RD.shape[0]:
        offs_E = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x_RD.device)
        return fp8_grouped(x_RD, offs_E, gate_up_EDI2, down_EID, *scales)
    return _per_expert_loop(x_RD, counts, gate_up_EDI2, down_EID, scales)


def _grouped(x_RD, counts, gate_up_EDI2, down_EID) -> torch.Tensor:
    offs_E = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x_RD.device)  # end rows
    return _grouped_offsets(x_RD, offs_E, gate_up_EDI2, down_EID)


def _grouped_offsets(x_RD, offs_E, gate_up_EDI2, down_EID) -> torch.Tensor:
    """Rows past offs_E[-1] are not multiplied; their outputs are unspecified."""
    width = down_EID.shape[1]
    gate_up_RI2 = torch._grouped_mm(x_RD, gate_up_EDI2, offs=offs_E)
    act_RI = gate_up_RI2[:, width:] * F.silu(gate_up_RI2[:, :width])
    return torch._grouped_mm(act_RI, down_EID, offs=offs_E)


def _per_expert_loop(x_RD, counts, gate_up_EDI2, down_EID, scales=None) -> torch.Tensor:
    """One expert at a time; FP8 weights (`scales` given) are dequantized to x's dtype just before use."""
    y_RD = torch.empty_like(x_RD)
    width = down_EID.shape[1]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        xs = x_RD[start : start + n]
        gate_up_DI2, down_ID = gate_up_EDI2[e], down_EID[e]
        if scales is not None:
            gate_up_DI2 = dequantize_columns(gate_up_DI2, scales[0][e], x_RD.dtype)
            down_ID = dequantize_columns(down_ID, scales[1][e], x_RD.dtype)
        gate_up = xs @ gate_up_DI2
        y_RD[start : start + n] = (gate_up[:, width:] * F.silu(gate_up[:, :width])) @ down_ID
        start += n
    return y_RD
