"""Shared machinery of the learned softmax routers (Switch top-1, GShard top-2).

Legend: T tokens, D model dim, E experts, K slots per token.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from moe_plugin.routing.interface import (
    DROPPED,
    Router,
    RouterOutput,
    TokenInfo,
    capacity,
    limit_capacity,
    router_z_loss,
    routing_entropy,
    switch_balance_loss,
)


class LinearGateRouter(Router):
    """A learned ``Linear(D, E)`` gate with optional fp32 logits, input jitter and capacity.

    Subclasses choose the experts from the probabilities in :meth:`select`.
    """

    def __init__(self, cfg, model_dim: int, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        self.gate = nn.Linear(model_dim, self.num_experts, bias=False)
        # small init keeps early routing close to uniform (Switch: scale 0.1 truncated normal)
        nn.init.normal_(self.gate.weight, std=0.1 / model_dim**0.5)
        self.use_fp32 = cfg.moe_gating_use_fp32
        self.jitter_eps = getattr(cfg, "moe_jitter_eps", 0.0)
        self.capacity_factor = cfg.moe_capacity_factor
        self.eval_capacity_factor = cfg.moe_eval_capacity_factor

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter_eps > 0:
            # Switch Transformer's multiplicative input jitter
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            x_TD = x_TD * noise
        if self.use_fp32:
            return nn.functional.linear(x_TD.float(), self.gate.weight.float())
        return self.gate(x_TD)

    def capacity_for(self, num_valid):
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return capacity(num_valid, self.num_experts, self.top_k, factor)

    def select(self, probs_TE: torch.Tensor, logits_TE: torch.Tensor):
        """-> (expert_ids_TK, weights_TK) before capacity; subclasses implement."""
        raise NotImplementedError

    def forward(self, x_TD: torch.Tensor, *, tokens: Optional[TokenInfo] = None):
        T = x_TD.shape[0]
        valid_T = (
            ~tokens.pad_mask_T if tokens is not None else torch.ones(T, dtype=torch.bool, device=x_TD.device)
        )
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        expert_ids_TK, weights_TK = self.select(probs_TE, logits_TE)
        # padding tokens are not routed: they take no capacity and produce nothing
        expert_ids_TK = expert_ids_TK.masked_fill(~valid_T.unsqueeze(-1), DROPPED)
        num_valid = valid_T.sum() if tokens is not None else T  # a tensor: no host sync
        cap = self.capacity_for(num_valid)
        routed_TK, weights_TK, stats = limit_capacity(expert_ids_TK, weights_TK, self.num_experts, cap)

        aux = {"balance": switch_balance_loss(probs_TE, expert_ids_TK[:, 0].clamp(min=0), valid_T)}
        aux["z"] = router_z_loss(logits_TE, valid_T)
        stats["entropy"] = routing_entropy(probs_TE.detach(), valid_T)
        return RouterOutput(routed_TK, weights_TK.to(x_TD.dtype), aux, stats)
