"""The Llama 4 text model on the router: embeddings, attention, routing, shared expert, dense MLPs, head.

Module names mirror the Hugging Face checkpoint (`model.layers.N.self_attn.q_proj.weight`, ...), so loading is
"read the tensor with the parameter's own name". Routed experts are not parameters here: the MoE layers reach
them through the transport given to `forward` (docs/llama4.md section 0).

Legend: T new tokens in the flat batch, D hidden, V vocab, N rows whose logits are wanted.
"""

from __future__ import annotations

import torch
from torch import nn

from cluster.attention import Attention, AttentionInputs, temperature_scale
from cluster.batch import ForwardBatch, KVCache
from cluster.config import ModelConfig
from cluster.mlp import MLP
from cluster.moe import MoE
from cluster.norm import RMSNorm
from cluster.rope import inverse_frequencies, rope_cos_sin
from cluster.transport import ExpertTransport


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.feed_forward = MoE(cfg, layer) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size_mlp)

    def forward(self, h_TD, inp: AttentionInputs, cache: KVCache, transport: ExpertTransport):
        h_TD = h_TD + self.self_attn(self.input_layernorm(h_TD), inp, cache)
        x_TD = self.post_attention_layernorm(h_TD)
        ffn_TD = self.feed_forward(x_TD, transport) if self.is_moe else self.feed_forward(x_TD)
        return h_TD + ffn_TD


class TextModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama4ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq_F", inverse_frequencies(cfg.rope, cfg.head_dim), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(
        self,
        ids_T: torch.Tensor,
        batch: ForwardBatch,
        cache: KVCache,
        transport: ExpertTransport,
        all_logits: bool = False,
        embeds_TD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [N, V] for each sequence's last new token (or every token when `all_logits`).

        `embeds_TD`, when given, replaces the token embeddings of `ids_T`: an image prompt's embeddings with image
        features at the `<|patch|>` rows (cluster/vision/merge.py)."""
        assert ids_T.shape[0] == batch.num_tokens, (ids_T.shape, batch.num_tokens)
        assert embeds_TD is None or embeds_TD.shape == (batch.num_tokens, self.config.hidden_size), embeds_TD.shape
        inp = self.attention_inputs(batch)
        h_TD = self.model.embed_tokens(ids_T) if embeds_TD is None else embeds_TD
        for layer in self.model.layers:
            h_TD = layer(h_TD, inp, cache, transport)
        if not all_logits:
            h_TD = h_TD[batch.last_rows()]
        return self.lm_head(self.model.norm(h_TD))

    def attention_inputs(self, batch: ForwardBatch) -> AttentionInputs:
        positions_T = batch.positions(self.device)
        cos_TF, sin_TF = rope_cos_sin(self.inv_freq_F, positions_T)
        temp = temperature_scale(self.config, positions_T) if self.config.attn_temperature_tuning else None
        return AttentionInputs(batch, positions_T, cos_TF, sin_TF, temp)
