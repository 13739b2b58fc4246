"""Llama 4 rotary embedding: interleaved pairs (GPT-J layout, not rotate_half), optional llama3 scaling.

Legend: T tokens, H heads, Dh head_dim, F = Dh/2 frequencies.
"""

from __future__ import annotations

import math

import torch

from cluster.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """[F] float32, exactly as transformers' default / llama3 rope initialisers compute them."""
    inv_freq_F = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "default":
        return inv_freq_F
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen_F = 2 * math.pi / inv_freq_F
    scaled_F = torch.where(wavelen_F > low_wavelen, inv_freq_F / rope.factor, inv_freq_F)
    smooth_F = (rope.original_max_position_embeddings / wavelen_F - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed_F = (1 - smooth_F) * scaled_F / rope.factor + smooth_F * scaled_F
    is_medium_F = ~(wavelen_F < high_wavelen) & ~(wavelen_F > low_wavelen)
    return torch.where(is_medium_F, smoothed_F, scaled_F)


def rope_cos_sin(inv_freq_F: torch.Tensor, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [T, F] float32 for absolute token positions."""
    angles_TF = positions_T.to(torch.float32)[:, None] * inv_freq_F.to(positions_T.device)[None, :]
    return torch.cos(angles_TF), torch.sin(angles_TF)


def apply_rope(x_THD: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) by angle pos*inv_freq[i]; computed in fp32, cast back."""
    xf = x_THD.float().unflatten(-1, (-1, 2))  # [T, H, F, 2]
    re, im = xf[..., 0], xf[..., 1]
    cos, sin = cos_TF[:, None, :], sin_TF[:, None, :]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.flatten(-2).to(x_THD.dtype)
