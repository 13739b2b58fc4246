"""From encoded patches to image features: pixel shuffle (each s x s block of patches becomes one token, s = 1/ratio),
the vision adapter (GELU after both layers, no biases) and the multimodal projector into the text model's width
(reference/llama4-vision.md steps 7-9). Module names mirror the checkpoint (`vision_model.vision_adapter.mlp.fc1`,
`multi_modal_projector.linear_1`).

Legend: T tiles, P patches per tile (side x side), C vision hidden, s shuffle factor, N = P / s^2 tokens per tile,
E = s^2 * C shuffled width, A adapter / vision output width, D text hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.vision.config import VisionConfig


def pixel_shuffle(x_TPC: torch.Tensor, s: int) -> torch.Tensor:
    """[T, P, C] -> [T, N, E]: out[t, h2*(side/s) + w2, (dy*s + dx)*C + c] = x[t, (s*h2 + dy)*side + s*w2 + dx, c]
    for dy, dx in [0, s)."""
    t, p, c = x_TPC.shape
    side = round(p**0.5)
    assert side * side == p and side % s == 0, (p, s)
    blocks = x_TPC.reshape(t, side // s, s, side // s, s, c)  # [T, h2, dy, w2, dx, C]
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(t, (side // s) ** 2, s * s * c)


class AdapterMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.intermediate_size, cfg.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(cfg.projector_output_dim, cfg.projector_output_dim, bias=False)

    def forward(self, x_TNE: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc2(F.gelu(self.fc1(x_TNE))))


class VisionAdapter(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.shuffle = cfg.shuffle_factor
        self.mlp = AdapterMLP(cfg)

    def forward(self, x_TPC: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x_TPC, self.shuffle))  # [T, N, A]


class MultiModalProjector(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.vision_output_dim, cfg.text_hidden_size, bias=False)

    def forward(self, x_TNA: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x_TNA)  # [T, N, D]
