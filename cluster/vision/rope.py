"""The vision encoder's 2D rotary embedding: each head's adjacent pairs (2m, 2m+1) form complex numbers (interleaved,
not rotate-half); the first half of the pairs turn with the patch's column, the second half with its row. Computed
in fp32 and cast back, as transformers does. The class token (last row) is not turned. Nothing is stored in
checkpoints: the table follows from the config alone.

Legend: T tiles, S tokens per tile (patches + class token), H heads, Dh head_dim, F = Dh/2 complex pairs.
"""

from __future__ import annotations

import torch

from cluster.vision.config import VisionConfig


def rotary_table(cfg: VisionConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """[S, F] complex64: pair m < F/2 turns by (x+1) * inv[m], pair m >= F/2 by (y+1) * inv[m - F/2], for the patch at
    column x, row y; the class token's row is 1 (angle 0)."""
    side, f = cfg.grid_side, cfg.head_dim // 2
    patch_P = torch.arange(side * side, dtype=torch.int32)
    x_P, y_P = patch_P % side, patch_P // side
    inv_freq_Q = 1.0 / (cfg.rope_theta ** (torch.arange(0, f, 2)[: f // 2].float() / f))  # Q = F/2 per axis
    angles_PF = torch.cat([(x_P + 1)[:, None] * inv_freq_Q, (y_P + 1)[:, None] * inv_freq_Q], dim=1)
    angles_SF = torch.cat([angles_PF, torch.zeros(1, f)])  # class token last, unrotated
    return torch.view_as_complex(torch.stack([torch.cos(angles_SF), torch.sin(angles_SF)], dim=-1)).to(device)


def apply_rotary(x_TSHD: torch.Tensor, table_SF: torch.Tensor) -> torch.Tensor:
    pairs_TSHF = torch.view_as_complex(x_TSHD.float().reshape(*x_TSHD.shape[:-1], -1, 2))
    return torch.view_as_real(pairs_TSHF * table_SF[None, :, None, :]).flatten(3).type_as(x_TSHD)
