"""Llama 4 MoE block on the router side: the gate (top-k with sigmoid weights applied to the expert INPUT), the
shared expert, and the routed experts reached through a transport.

Naming: the gate's weight is called `router` in Llama 4 checkpoints (`feed_forward.router.weight`), and module
names mirror checkpoint keys, so the attribute keeps that name. Everywhere else in this codebase "router" means
the attention-side actor; the MoE's expert choice is "the gate".

Legend: T tokens, D hidden, E experts, k experts per token, R = T*k rows.
"""

from __future__ import annotations

import torch
from torch import nn

from cluster.config import ModelConfig
from cluster.mlp import MLP
from cluster.transport import ExpertTransport


def top_k_gates(gate_logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] and gates [T, k]: sigmoid of the selected logits only (no softmax, no renormalisation)."""
    top_v_Tk, ids_Tk = torch.topk(gate_logits_TE, top_k, dim=-1)
    return ids_Tk, torch.sigmoid(top_v_Tk.float()).to(gate_logits_TE.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.top_k = layer, cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)  # the gate (checkpoint name)
        self.shared_expert = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.register_buffer(
            "tokens_per_expert", torch.zeros(cfg.num_local_experts, dtype=torch.int64), persistent=False
        )

    def forward(self, x_TD: torch.Tensor, transport: ExpertTransport) -> torch.Tensor:
        ids_Tk, gates_Tk = top_k_gates(self.router(x_TD), self.top_k)
        token_R = torch.arange(x_TD.shape[0], device=x_TD.device).repeat_interleave(self.top_k)
        rows_RD = x_TD[token_R] * gates_Tk.reshape(-1, 1)
        handle = transport.dispatch(self.layer, rows_RD, ids_Tk.reshape(-1))
        shared_TD = self.shared_expert(x_TD)  # overlaps the experts' compute when they are remote
        routed_TD = torch.zeros_like(x_TD).index_add_(0, token_R, transport.combine(handle))
        # routed tokens per expert since start, for stats (on the device: no sync)
        self.tokens_per_expert += torch.bincount(ids_Tk.reshape(-1), minlength=self.router.out_features)
        return shared_TD + routed_TD
