"""Llama 4 MoE block on the router side: the gate (top-k with sigmoid weights applied to the expert INPUT), the
shared expert, and the routed experts reached through a transport.

Naming: the gate's weight is called `router` in Llama 4 checkpoints (`feed_forward.router.weight`), and module
names mirror checkpoint keys, so the attribute keeps that name. Everywhere else in this codebase "router" means
the attention-side actor; the MoE's expert choice is "the gate".

Legend: T tokens, D hidden, E experts, k experts per token, R = T*k rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cluster.config import ModelConfig
from cluster.mlp import MLP
from cluster.transport import ExpertTransport


def top_k_gates(gate_logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] and gates [T, k]: sigmoid of the selected logits only (no softmax, no renormalisation)."""
    top_v_Tk, ids_Tk = torch.topk(gate_logits_TE, top_k, dim=-1)
    return ids_Tk, torch.sigmoid(top_v_Tk.float()).to(gate_logits_TE.dtype)


@dataclass
class Routed:
    """An MoE layer between dispatch and combine."""

    x_TD: torch.Tensor
    token_R: torch.Tensor  # the token of each dispatched row
    handle: Any  # the transport's
    transport: ExpertTransport


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
        return self.end(self.begin(x_TD, transport))

    def begin(self, x_TD: torch.Tensor, transport: ExpertTransport) -> Routed:
        """Gate the tokens and dispatch their rows; `end` finishes the layer."""
        ids_Tk, gates_Tk = top_k_gates(self.router(x_TD), self.top_k)
        token_R = torch.arange(x_TD.shape[0], device=x_TD.device).repeat_interleave(self.top_k)
        rows_RD = x_TD[token_R] * gates_Tk.reshape(-1, 1)
        expert_R = ids_Tk.reshape(-1)
        handle = transport.dispatch(self.layer, rows_RD, expert_R)
        # routed tokens per expert since start, for stats (index_add_, unlike bincount, never syncs on a GPU)
        self.tokens_per_expert.index_add_(0, expert_R, torch.ones_like(expert_R))
        return Routed(x_TD, token_R, handle, transport)

    def end(self, routed: Routed) -> torch.Tensor:
        shared_TD = self.shared_expert(routed.x_TD)  # overlaps the experts' compute when they are remote
        combined_RD = routed.transport.combine(routed.handle)
        return shared_TD + torch.zeros_like(routed.x_TD).index_add_(0, routed.token_R, combined_RD)
