"""Llama 4 attention: GQA; RoPE layers use interleaved RoPE, weightless RMS qk-norm (Scout) and chunked local
attention; NoPE layers use global attention with temperature tuning of q (docs/llama4.md section 3).

Legend: T new tokens, H q heads, K kv heads, Dh head_dim, S keys of one sequence, D hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cluster.batch import ForwardBatch, KVCache
from cluster.config import ModelConfig
from cluster.norm import rms_normalize
from cluster.rope import apply_rope


@dataclass
class AttentionInputs:
    """Per-forward values shared by every attention layer, computed once."""

    batch: ForwardBatch
    positions_T: torch.Tensor  # int64
    cos_TF: torch.Tensor
    sin_TF: torch.Tensor
    temp_scale_T: torch.Tensor | None  # float32, NoPE layers only
    memo: dict = field(default_factory=dict)  # padded query layout and masks, shared by layers of one kind

    def query_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rows_Nt (index into T; 0 where padded), valid_Nt, pos_Nt (-1 where padded) for the batched path."""
        if "queries" not in self.memo:
            seqs, t = self.batch.seqs, max(s.length for s in self.batch.seqs)
            offsets = torch.arange(t)
            rows = torch.stack([s.start + offsets for s in seqs])
            valid = offsets[None, :] < torch.tensor([s.length for s in seqs])[:, None]
            pos = torch.stack([s.pos0 + offsets for s in seqs])
            dev = self.positions_T.device
            self.memo["queries"] = (rows.where(valid, 0).to(dev), valid.to(dev), pos.where(valid, -1).to(dev))
        return self.memo["queries"]


def temperature_scale(cfg: ModelConfig, positions_T: torch.Tensor) -> torch.Tensor:
    """1 + attn_scale * ln(1 + floor((t + 1) / floor_scale)), float32 [T]."""
    t = positions_T.to(torch.float32)
    return torch.log1p(torch.floor((t + 1) / cfg.floor_scale)) * cfg.attn_scale + 1.0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.use_rope = cfg.rope_layers[layer]
        self.qk_norm = cfg.use_qk_norm and self.use_rope
        self.temp_tuning = cfg.attn_temperature_tuning and not self.use_rope
        self.chunk = cfg.attention_chunk_size if self.use_rope else None
        self.eps = cfg.rms_norm_eps
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x_TD: torch.Tensor, inp: AttentionInputs, cache: KVCache) -> torch.Tensor:
        q_THD = self.q_proj(x_TD).unflatten(-1, (self.n_heads, self.head_dim))
        k_TKD = self.k_proj(x_TD).unflatten(-1, (self.n_kv, self.head_dim))
        v_TKD = self.v_proj(x_TD).unflatten(-1, (self.n_kv, self.head_dim))
        if self.use_rope:
            q_THD = apply_rope(q_THD, inp.cos_TF, inp.sin_TF)
            k_TKD = apply_rope(k_TKD, inp.cos_TF, inp.sin_TF)
            if self.qk_norm:
                q_THD, k_TKD = rms_normalize(q_THD, self.eps), rms_normalize(k_TKD, self.eps)
        elif self.temp_tuning:
            q_THD = (q_THD * inp.temp_scale_T[:, None, None]).to(q_THD.dtype)
        if len(inp.batch.seqs) > 1 and hasattr(cache, "store_and_load_batch"):
            return self.o_proj(self._attend_batched(q_THD, k_TKD, v_TKD, inp, cache).flatten(-2))
        out_THD = torch.empty_like(q_THD)
        for seq in inp.batch.seqs:  # the reference path: one sequence at a time
            rows = slice(seq.start, seq.end)
            lo = self._window_start(seq.pos0)
            k_SKD, v_SKD = cache.store_and_load(self.layer, seq, k_TKD[rows], v_TKD[rows], lo)
            out_THD[rows] = self._attend(q_THD[rows], k_SKD, v_SKD, seq.pos0, lo)
        return self.o_proj(out_THD.flatten(-2))

    def _window_start(self, pos0: int) -> int:
        """The first position a query at `pos0` may see: its chunk's start on chunked layers, else 0."""
        return (pos0 // self.chunk) * self.chunk if self.chunk else 0

    def _visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Causal, and within the same chunk on chunked layers (positions are absolute)."""
        allowed = k_pos <= q_pos
        if self.chunk is not None:
            allowed = allowed & (k_pos // self.chunk == q_pos // self.chunk)
        return allowed

    def _attend_batched(self, q_THD, k_TKD, v_TKD, inp: AttentionInputs, cache) -> torch.Tensor:
        """Every sequence in one SDPA call: queries and keys padded to the longest, padding masked out."""
        lo = tuple(self._window_start(s.pos0) for s in inp.batch.seqs)
        k_NSKD, v_NSKD, kpos_NS = cache.store_and_load_batch(self.layer, inp.batch, k_TKD, v_TKD, lo)
        rows_Nt, valid_Nt, qpos_Nt = inp.query_layout()
        key = ("mask", self.chunk)
        if key not in inp.memo:
            k_pos = kpos_NS[:, None, :]
            mask_NtS = (k_pos >= 0) & self._visible(qpos_Nt[:, :, None], k_pos)
            mask_NtS |= ~valid_Nt[:, :, None] & (torch.arange(mask_NtS.shape[2], device=mask_NtS.device) == 0)
            inp.memo[key] = mask_NtS[:, None]  # padded query rows see key 0 only: no NaN, discarded below
        group = self.n_heads // self.n_kv
        out_NHtD = F.scaled_dot_product_attention(
            q_THD[rows_Nt].transpose(1, 2),
            k_NSKD.transpose(1, 2).repeat_interleave(group, dim=1),
            v_NSKD.transpose(1, 2).repeat_interleave(group, dim=1),
            attn_mask=inp.memo[key],
            scale=1.0 / math.sqrt(self.head_dim),
        )
        out_THD = torch.empty_like(q_THD)
        out_THD[rows_Nt[valid_Nt]] = out_NHtD.transpose(1, 2)[valid_Nt]
        return out_THD

    def _attend(self, q_tHD, k_SKD, v_SKD, pos0: int, lo: int) -> torch.Tensor:
        t, s = q_tHD.shape[0], k_SKD.shape[0]
        mask_tS = None
        needs_mask = t > 1 or (self.chunk is not None and lo // self.chunk != (pos0 + t - 1) // self.chunk)
        if needs_mask:
            q_pos = torch.arange(pos0, pos0 + t, device=q_tHD.device)[:, None]
            k_pos = torch.arange(lo, lo + s, device=q_tHD.device)[None, :]
            mask_tS = self._visible(q_pos, k_pos)
        group = self.n_heads // self.n_kv
        out_HtD = F.scaled_dot_product_attention(
            q_tHD.transpose(0, 1),
            k_SKD.transpose(0, 1).repeat_interleave(group, dim=0),
            v_SKD.transpose(0, 1).repeat_interleave(group, dim=0),
            attn_mask=mask_tS,
            scale=1.0 / math.sqrt(self.head_dim),
        )
        return out_HtD.transpose(0, 1)
