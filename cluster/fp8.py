"""FP8 (e4m3) weights with one scale per output channel, as compressed-tensors stores them, and the routed experts'
compute on them.

Storage: `w = q.float() * scale` with `q` float8_e4m3fn in the `[out, in]` layout and `scale = rowmax|w| / 448`
(symmetric, static, per channel). Expert shards keep `q` resident with fp32 scales (cluster/experts.py).

Compute:
- Anywhere (CPU, any GPU; cluster/experts.py): each expert's weights are dequantized on the fly into the
  activations' dtype and multiplied as usual; with fp32 activations this is exactly the fp32 model on the
  dequantized weights.
- CUDA sm90+: activations are quantized per token, dynamically (the `input_activations` scheme of the official
  checkpoints), and both matmuls run as `torch._scaled_grouped_mm` with row-wise scales, device-side offsets,
  bf16 output (`fp8_grouped_supported` says when).

Legend: R rows, D hidden, I expert width, E local experts, O output channels, K input channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_EPS = torch.finfo(torch.float32).eps


def quantize_rows(w_OK: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [O, K] float8_e4m3fn, scale [O] fp32) with `q * scale ~ w`. The scale is rounded to `scale_dtype` (the
    dtype a checkpoint stores it in; default: w's) before quantizing, so that a checkpoint written with it and a
    quantization at load give the same bits."""
    amax_O = w_OK.float().abs().amax(dim=-1)
    scale_O = (amax_O / FP8_MAX).clamp(min=_EPS).to(scale_dtype or w_OK.dtype).float()
    q_OK = (w_OK.float() / scale_O[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q_OK, scale_O


def dequantize_rows(q_OK: torch.Tensor, scale_O: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[O, K] in `dtype`: computed in fp32, as transformers' compressed-tensors loader does."""
    return (q_OK.float() * scale_O.float()[:, None]).to(dtype)


def dequantize_columns(w_KO: torch.Tensor, scale_O: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An FP8 weight used as x @ W ([in, out], a transposed view of its storage) in `dtype`, scaled per column."""
    return (w_KO.float() * scale_O).to(dtype)


def fp8_grouped_supported(x_RD: torch.Tensor, gate_up_EDI2: torch.Tensor, down_EID: torch.Tensor) -> bool:
    """torch._scaled_grouped_mm: bf16 activations on CUDA sm90 or newer, dims divisible by 16, weights in the
    transposed layout."""
    if not (x_RD.is_cuda and x_RD.dtype == torch.bfloat16 and hasattr(torch, "_scaled_grouped_mm")):
        return False  # fp32 activations: the exact path (weights dequantized), as the user asked for fp32
    if torch.cuda.get_device_capability(x_RD.device) < (9, 0):
        return False
    dims = (gate_up_EDI2.shape[1], gate_up_EDI2.shape[2], down_EID.shape[1])
    column_major = gate_up_EDI2.stride(1) == 1 and down_EID.stride(1) == 1
    return column_major and all(n % 16 == 0 for n in dims)


def quantize_tokens(x_RD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic FP8: (q [R, D], scale [R] fp32)."""
    scale_R = (x_RD.float().abs().amax(dim=-1) / FP8_MAX).clamp(min=_EPS)
    return (x_RD.float() / scale_R[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale_R


def fp8_grouped(x_RD, offs_E, gate_up_EDI2, down_EID, gate_up_scale_EI2, down_scale_ED) -> torch.Tensor:
    """Both matmuls as torch._scaled_grouped_mm (rows past offs_E[-1]: unspecified outputs). W8A8: activations are
    quantized per token, so results differ from the dequantized bf16 model by FP8 rounding of the activations."""
    width = down_EID.shape[1]
    x8_RD, xs_R = quantize_tokens(x_RD)
    gate_up_RI2 = torch._scaled_grouped_mm(
        x8_RD, gate_up_EDI2, xs_R, gate_up_scale_EI2, offs=offs_E, out_dtype=torch.bfloat16
    )
    act_RI = gate_up_RI2[:, width:] * F.silu(gate_up_RI2[:, :width])
    a8_RI, as_R = quantize_tokens(act_RI)
    y_RD = torch._scaled_grouped_mm(a8_RI, down_EID, as_R, down_scale_ED, offs=offs_E, out_dtype=torch.bfloat16)
    return y_RD.to(x_RD.dtype)
