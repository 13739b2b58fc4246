"""The Llama 4 vision tower: pixel tiles in, image features in the text model's width out.

Per tile (reference/llama4-vision.md, "Vision forward"): unfold into patches and embed (no bias), append the class
token at the END, add the positional embedding, layernorm_pre, the encoder layers with the 2D rotary embedding,
layernorm_post, drop the class token, pixel shuffle, the vision adapter, and `multi_modal_projector.linear_1`.
Module names mirror the checkpoint keys (`vision_model.patch_embedding.linear.weight`, ...,
`multi_modal_projector.linear_1.weight`), so loading is "read the tensor with the parameter's own name".

Legend: T tiles, K = 3 * patch^2 values per patch, P patches per tile, S = P + 1 tokens, C vision hidden,
N image tokens per tile, A vision output width, D text hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.vision.adapter import MultiModalProjector, VisionAdapter
from cluster.vision.config import VisionConfig
from cluster.vision.encoder import VisionEncoder
from cluster.vision.rope import rotary_table


class PatchEmbedding(nn.Module):
    """Equal to a stride-`patch` conv2d with the weight viewed as [C, 3, patch, patch]; K is ordered (c, ky, kx)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch = cfg.patch_size
        self.linear = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size, bias=False)

    def forward(self, pixels_T3HW: torch.Tensor) -> torch.Tensor:
        patches_TKP = F.unfold(pixels_T3HW, kernel_size=self.patch, stride=self.patch)
        return self.linear(patches_TKP.transpose(1, 2))  # [T, P, C]; patch p = y * side + x


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        c = cfg.hidden_size
        self.patch_embedding = PatchEmbedding(cfg)
        self.class_embedding = nn.Parameter(torch.empty(c))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(cfg.num_patches + 1, c))
        self.layernorm_pre = nn.LayerNorm(c)
        self.layernorm_post = nn.LayerNorm(c)
        self.model = VisionEncoder(cfg)
        self.vision_adapter = VisionAdapter(cfg)

    def forward(self, pixels_T3HW: torch.Tensor) -> torch.Tensor:
        """[T, 3, image_size, image_size] -> [T, N, A] adapter output."""
        patches_TPC = self.patch_embedding(pixels_T3HW)
        cls_T1C = self.class_embedding.expand(patches_TPC.shape[0], 1, -1)
        h_TSC = torch.cat([patches_TPC, cls_T1C], dim=1) + self.positional_embedding_vlm
        h_TSC = self.model(self.layernorm_pre(h_TSC), rotary_table(self.config, h_TSC.device))
        return self.vision_adapter(self.layernorm_post(h_TSC)[:, :-1])


class VisionTower(nn.Module):
    """`vision_model` and `multi_modal_projector` of Llama4ForConditionalGeneration, by their checkpoint names."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = VisionModel(cfg)
        self.multi_modal_projector = MultiModalProjector(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear_1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.multi_modal_projector.linear_1.weight.device

    def forward(self, pixels_T3HW: torch.Tensor) -> torch.Tensor:
        """Image features [T * N, D] for tiles [T, 3, S, S] (one image's tiles, global tile last, or several images'
        tiles one after another): row t * N + n fills the image's (t * N + n)-th `<|patch|>` position.

        Pixels of any dtype (the preprocessor's bf16) are cast to the tower's dtype first."""
        cfg = self.config
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixels_T3HW.dim() != 4 or tuple(pixels_T3HW.shape[1:]) != expected:
            raise ValueError(
                f"pixel values must be [tiles, {', '.join(map(str, expected))}], got {list(pixels_T3HW.shape)}"
            )
        features_TNA = self.vision_model(pixels_T3HW.to(device=self.device, dtype=self.dtype))
        return self.multi_modal_projector(features_TNA).flatten(0, 1)
