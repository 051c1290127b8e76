"""Dispatchers: move token slots to experts and results back. They know nothing of experts.

Legend: T tokens, K slots per token, S = T*K slots, D model dim, E experts, n kept slots.

Plan of the permutation (local mode): flatten the (T, K) slots and stable-sort them by
expert id, dropped slots (id -1) last, so the rows for expert 0 come first, then expert 1,
... and then the *tail* of dropped slots. All S rows are gathered: cutting the tail off
would need its length on the host, a device sync per layer; the expert bank computes only
the first ``counts_E.sum()`` rows and returns zeros for the tail
(:class:`moe_plugin.experts.ExpertBank`). ``token_N`` remembers which token each sorted row
came from; combine scatters the weighted expert outputs back with ``index_add`` (a token
with K slots receives K contributions; a token with none receives zero, so the surrounding
residual passes it through). Gathers use ``index_select``, whose backward is an
``index_add`` (an indexed ``x[idx]`` differentiates to the slower ``index_put``).
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import torch

from moe_plugin.dispatch.placement import ExpertPlacement, simulated_homes, traffic_stats
from moe_plugin.routing.interface import tokens_per_expert


@dataclasses.dataclass
class DispatchPlan:
    token_N: torch.Tensor  # source token of each sorted row (all S slots, dropped ones last)
    slot_N: torch.Tensor  # index into the flattened (T*K) slots of each sorted row
    num_tokens: int


class LocalDispatcher:
    """All experts live in this process (plain data parallelism across ranks)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.placement = ExpertPlacement(num_experts)  # every expert here

    def traffic_stats(self, expert_ids_TK, valid_T, *, simulated_devices: int, plain_ids_TK=None):
        """Cross-device traffic (:func:`moe_plugin.dispatch.placement.traffic_stats`) as if
        the experts lay on ``simulated_devices`` devices in contiguous blocks and the T rows
        were split into as many equal contiguous blocks, block r living on device r."""
        placement = ExpertPlacement(self.num_experts, simulated_devices)
        home_T = simulated_homes(expert_ids_TK.shape[0], simulated_devices, expert_ids_TK.device)
        return traffic_stats(expert_ids_TK, home_T, placement, valid_T, plain_ids_TK)

    def dispatch(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
        """-> (S rows sorted by expert, dropped last (S, D); kept rows per expert (E,); plan)."""
        slot_N, token_N, counts_E = self._sort_slots(expert_ids_TK)
        return x_TD.index_select(0, token_N), counts_E, DispatchPlan(token_N, slot_N, expert_ids_TK.shape[0])

    def _sort_slots(self, expert_ids_TK: torch.Tensor):
        """-> (slot_N, token_N, counts_E): the slots sorted by expert (stable), dropped ones
        last, each sorted row's token, and the kept rows per expert."""
        K = expert_ids_TK.shape[1]
        ids_S = expert_ids_TK.reshape(-1)
        # dropped slots sort last (key E)
        key_S = torch.where(ids_S >= 0, ids_S, torch.full_like(ids_S, self.num_experts))
        slot_N = torch.argsort(key_S, stable=True)
        token_N = slot_N if K == 1 else torch.div(slot_N, K, rounding_mode="floor")
        return slot_N, token_N, tokens_per_expert(expert_ids_TK, self.num_experts)

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Weighted sum of each token's expert outputs -> (T, D).

        ``y_ND`` holds the first ``y_ND.shape[0]`` sorted rows (all S, or the kept ones):
        rows past it, and dropped rows (zero weight, zero output), contribute nothing.
        """
        n = y_ND.shape[0]
        slot_n, token_n = plan.slot_N[:n], plan.token_N[:n]
        w_n = weights_TK.reshape(-1).index_select(0, slot_n).to(y_ND.dtype)
        out_TD = y_ND.new_zeros(plan.num_tokens, y_ND.shape[1])
        return out_TD.index_add(0, token_n, y_ND * w_n.unsqueeze(1))

    def dispatch_compute_combine(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                                 experts, impl: str) -> torch.Tensor:
        """``combine(experts(dispatch(x)))`` in one step: the same permutation, but the bank's
        :meth:`~moe_plugin.experts.ExpertBank.forward_combined` gathers, computes and scatters
        without keeping the gathered rows or the expert outputs for backward -> (T, D)."""
        slot_N, token_N, counts_E = self._sort_slots(expert_ids_TK)
        w_N = weights_TK.reshape(-1).index_select(0, slot_N).to(x_TD.dtype)
        return experts.forward_combined(x_TD, w_N, token_N, counts_E, impl)

