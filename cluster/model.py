"""The Llama 4 text model on the router: embeddings, attention, routing, shared expert, dense MLPs, head.

Module names mirror the Hugging Face checkpoint (`model.layers.N.self_attn.q_proj.weight`, ...), so loading is
"read the tensor with the parameter's own name". Routed experts are not parameters here: the MoE layers reach
them through the transport given to `forward` (docs/llama4.md section 0).

With micro-batches (cluster/micro_batch.py) the layers run ping-pong, so that the router's attention for one
micro-batch overlaps the remote experts' work for another:

    layer L:   attn+dispatch mb0 | attn+dispatch mb1 | combine mb0, then layer L+1: attn+dispatch mb0 | combine mb1 ...

Every micro-batch sees the same layers in the same order; the expert exchanges of a layer go out in micro-batch
order (the transport's protocol). Outputs match one batch token for token, not bit for bit: on CPU a row's float
result depends on how many rows its matmul has.

Legend: T new tokens in the flat batch, D hidden, V vocab, N rows whose logits are wanted.
"""

from __future__ import annotations

import torch
from torch import nn

from cluster.attention import Attention, AttentionInputs, temperature_scale
from cluster.batch import ForwardBatch, KVCache
from cluster.config import ModelConfig
from cluster.micro_batch import MicroBatch, split_batch
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
        return self.finish(self.start(h_TD, inp, cache, transport))

    def start(self, h_TD, inp: AttentionInputs, cache: KVCache, transport: ExpertTransport) -> tuple:
        """Attention, then the feed-forward up to its routed rows' dispatch (a dense MLP runs whole)."""
        h_TD = h_TD + self.self_attn(self.input_layernorm(h_TD), inp, cache)
        x_TD = self.post_attention_layernorm(h_TD)
        return h_TD, self.feed_forward.begin(x_TD, transport) if self.is_moe else self.feed_forward(x_TD)

    def finish(self, started: tuple) -> torch.Tensor:
        h_TD, ffn = started
        return h_TD + (self.feed_forward.end(ffn) if self.is_moe else ffn)


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
        micro_batches: int = 1,
        embeds_TD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [N, V] for each sequence's last new token (or every token when `all_logits`), running the batch
        as up to `micro_batches` micro-batches.

        `embeds_TD`, when given, replaces the token embeddings of `ids_T`: an image prompt's embeddings with image
        features at the `<|patch|>` rows (cluster/vision/merge.py)."""
        assert ids_T.shape[0] == batch.num_tokens, (ids_T.shape, batch.num_tokens)
        assert embeds_TD is None or embeds_TD.shape == (batch.num_tokens, self.config.hidden_size), embeds_TD.shape
        h_TD = self.model.embed_tokens(ids_T) if embeds_TD is None else embeds_TD
        parts = split_batch(batch, micro_batches)
        if len(parts) > 1:
            h_TD = torch.cat(self._ping_pong(h_TD, parts, cache, transport))
        else:
            inp = self.attention_inputs(batch)
            for layer in self.model.layers:
                h_TD = layer(h_TD, inp, cache, transport)
        if not all_logits:
            h_TD = h_TD[batch.last_rows()]
        return self.lm_head(self.model.norm(h_TD))

    def _ping_pong(self, h_TD, parts: tuple[MicroBatch, ...], cache, transport) -> list[torch.Tensor]:
        """Each micro-batch's hidden states after the last layer, from the step's input embeddings; a
        micro-batch's feed-forward is finished just before its next layer starts, so the others' dispatched rows
        are with the experts meanwhile."""
        inps = [self.attention_inputs(p.batch) for p in parts]
        hs = [h_TD[p.rows] for p in parts]
        started: list[tuple | None] = [None] * len(parts)
        previous = None
        for layer in self.model.layers:
            for i, inp in enumerate(inps):
                h_TD = hs[i] if previous is None else previous.finish(started[i])
                started[i] = layer.start(h_TD, inp, cache, transport)
            previous = layer
        return [previous.finish(s) for s in started]

    def attention_inputs(self, batch: ForwardBatch) -> AttentionInputs:
        positions_T = batch.positions(self.device)
        cos_TF, sin_TF = rope_cos_sin(self.inv_freq_F, positions_T)
        temp = temperature_scale(self.config, positions_T) if self.config.attn_temperature_tuning else None
        return AttentionInputs(batch, positions_T, cos_TF, sin_TF, temp)
