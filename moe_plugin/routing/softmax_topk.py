"""Shared machinery of the learned softmax routers (Switch top-1, GShard top-2).

Legend: T tokens, D model dim, E experts, K slots per token.
"""

from __future__ import annotations

import math
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

#: --moe-router-init values (see :func:`init_gate_weight_`)
ROUTER_INITS = ("switch", "linear", "xavier")


def init_gate_weight_(weight_ED: torch.Tensor, scheme: str, scale: float) -> torch.Tensor:
    """Initialise a gate weight (E, D) in place; D = fan-in (the model dim).

    * ``switch`` (default): Switch Transformer Sec. 2.4 "Smaller parameter initialization
      for stability": a normal with mean 0 and std sigma = sqrt(s / D), s = ``scale`` (the
      paper's 0.1), truncated at +-2 sigma (sigma is the std before truncation, as in
      TensorFlow's ``truncated_normal`` and ``torch.nn.init.trunc_normal_``; the values'
      std is 0.88 sigma).
    * ``linear``: PyTorch's ``nn.Linear`` default (Kaiming uniform, a = sqrt(5), i.e.
      U(-1/sqrt(D), 1/sqrt(D))), which the gates of fairseq's moe branch get
      (``fairseq/modules/moe/top1gate.py`` / ``top2gate.py``: ``Linear(model_dim, E)``).
    * ``xavier``: Xavier/Glorot uniform, U(-sqrt(6 / (D + E)), +sqrt(6 / (D + E))), the
      default initializer of Hetu's SAM gate (``python/hetu/layers/SAMGate.py``).
    """
    if scheme not in ROUTER_INITS:
        raise ValueError(f"--moe-router-init: {scheme!r} is not allowed; allowed: {', '.join(ROUTER_INITS)}")
    if not (scale > 0) or math.isinf(scale):
        raise ValueError(f"--moe-router-init-scale: {scale} is not allowed; allowed: a finite number > 0")
    with torch.no_grad():
        if scheme == "switch":
            sigma = math.sqrt(scale / weight_ED.shape[1])
            nn.init.trunc_normal_(weight_ED, mean=0.0, std=sigma, a=-2.0 * sigma, b=2.0 * sigma)
        elif scheme == "linear":
            nn.init.kaiming_uniform_(weight_ED, a=math.sqrt(5))
        else:
            nn.init.xavier_uniform_(weight_ED)
    return weight_ED


class LinearGateRouter(Router):
    """A learned ``Linear(D, E)`` gate with optional fp32 logits, input jitter and capacity.

    Subclasses choose the experts from the probabilities in :meth:`select`.
    """

    def __init__(self, cfg, model_dim: int, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        self.gate = nn.Linear(model_dim, self.num_experts, bias=False)
        init_gate_weight_(
            self.gate.weight, getattr(cfg, "moe_router_init", "switch"), getattr(cfg, "moe_router_init_scale", 0.1)
        )
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
