"""Dispatchers: move token slots to experts and results back. They know nothing of experts.

Legend: T tokens, K slots per token, D model dim, E experts, N routed slots (kept ones).

Plan of the permutation (local mode): flatten the (T, K) slots, keep those with an expert,
stable-sort them by expert id, so the rows for expert 0 come first, then expert 1, ...
``token_N`` remembers which token each sorted row came from; combine scatters the weighted
expert outputs back with ``index_add`` (a token with K slots receives K contributions; a
token with none receives zero, so the surrounding residual passes it through).
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import torch


@dataclasses.dataclass
class DispatchPlan:
    token_N: torch.Tensor  # source token of each sorted row
    slot_N: torch.Tensor  # index into the flattened (T*K) slots of each sorted row
    num_tokens: int


class LocalDispatcher:
    """All experts live in this process (plain data parallelism across ranks)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
        """-> (rows sorted by expert (N, D), rows per expert (E,), plan for :meth:`combine`)."""
        T, K = expert_ids_TK.shape
        ids_S = expert_ids_TK.reshape(-1)  # S = T*K slots
        kept_S = ids_S >= 0
        # dropped slots sort last (key E) and are cut off after the sort
        key_S = torch.where(kept_S, ids_S, torch.full_like(ids_S, self.num_experts))
        order_S = torch.argsort(key_S, stable=True)
        counts_E = torch.bincount(ids_S[kept_S], minlength=self.num_experts)
        n = int(kept_S.sum())
        slot_N = order_S[:n]
        token_N = torch.div(slot_N, K, rounding_mode="floor")
        return x_TD[token_N], counts_E, DispatchPlan(token_N, slot_N, T)

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Weighted sum of each token's expert outputs -> (T, D)."""
        w_N = weights_TK.reshape(-1)[plan.slot_N].to(y_ND.dtype)
        out_TD = y_ND.new_zeros(plan.num_tokens, y_ND.shape[1])
        return out_TD.index_add(0, plan.token_N, y_ND * w_N.unsqueeze(1))
