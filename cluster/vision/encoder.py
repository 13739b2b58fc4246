"""The vision transformer's encoder layers: pre-norm (LayerNorm, eps 1e-5), bidirectional multi-head attention with
the 2D rotary embedding on q and k, and a GELU MLP; every linear has a bias (reference/llama4-vision.md step 4).

Module names mirror the checkpoint (`vision_model.model.layers.{i}.self_attn.q_proj.weight`, ...).
Legend: T tiles, S tokens per tile (patches + class token), C hidden, H heads, Dh head_dim, F = Dh/2 pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.vision.config import VisionConfig
from cluster.vision.rope import apply_rotary


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.o_proj = nn.Linear(c, c)

    def forward(self, x_TSC: torch.Tensor, rope_SF: torch.Tensor) -> torch.Tensor:
        heads = (self.n_heads, self.head_dim)
        q_TSHD = apply_rotary(self.q_proj(x_TSC).unflatten(-1, heads), rope_SF)
        k_TSHD = apply_rotary(self.k_proj(x_TSC).unflatten(-1, heads), rope_SF)
        v_TSHD = self.v_proj(x_TSC).unflatten(-1, heads)
        out_THSD = F.scaled_dot_product_attention(
            q_TSHD.transpose(1, 2), k_TSHD.transpose(1, 2), v_TSHD.transpose(1, 2)
        )  # no mask; scale head_dim^-0.5
        return self.o_proj(out_THSD.transpose(1, 2).flatten(2))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x_TSC: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_TSC)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size)
        self.self_attn = VisionAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size)
        self.mlp = VisionMLP(cfg)

    def forward(self, h_TSC: torch.Tensor, rope_SF: torch.Tensor) -> torch.Tensor:
        h_TSC = h_TSC + self.self_attn(self.input_layernorm(h_TSC), rope_SF)
        return h_TSC + self.mlp(self.post_attention_layernorm(h_TSC))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, h_TSC: torch.Tensor, rope_SF: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h_TSC = layer(h_TSC, rope_SF)
        return h_TSC
