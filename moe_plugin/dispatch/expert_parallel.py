"""Expert parallelism: each of W ranks holds E/W experts; tokens travel by all-to-all.

Legend: T tokens on this rank, K slots per token, D model dim, E experts in the layer,
W ranks, L = E/W experts per rank (rank w holds global experts w*L .. w*L+L-1: the
:class:`moe_plugin.dispatch.placement.ExpertPlacement`),
N slots this rank sends (kept slots, sorted by global expert), R rows this rank receives.

Plan of the permutations (:class:`ExpertParallelDispatcher`):

1. Local sort: the kept (token, slot) pairs are sorted by global expert exactly as
   :class:`moe_plugin.dispatch.LocalDispatcher` does. Experts of rank w are contiguous,
   so the sorted rows are already grouped by destination rank: ``send_W = counts_E.view(W,
   L).sum(1)`` rows go to rank w.
2. Counts exchange: rank w learns ``recv_WL[v, l]`` = rows rank v sends to its local
   expert l (one small all-to-all of W*L integers).
3. Row exchange (differentiable all-to-all): rows arrive grouped by (source rank v, local
   expert l). The expert bank wants them grouped by local expert, so a stable sort by l
   reorders them to (l, v): ``order_R``. Counts per local expert: ``recv_WL.sum(0)``.
4. Combine: undo ``order_R``, send every row back with the reverse all-to-all (it lands
   at the position it left from), then the local weighted scatter-add of step 1.

For K > 1 the dispatcher sends one row per (token, destination rank) instead of one per
slot (the "token exchange" of :class:`ExpertParallelDispatcher`): a token whose experts
share a rank travels there once.

A rank that sends or receives nothing still takes part in both exchanges (with zero
splits) and its expert bank still puts its parameters in the graph (with a zero
contribution), so the collectives of forward and backward match on every rank.

Routing is per rank: every rank routes its own T tokens (capacity, BASE's balanced
assignment, balance losses are computed over the rank's batch), exactly as in local
data-parallel mode. Expert parallelism changes where an expert runs, never what a token
computes: W ranks in expert-parallel mode equal one process holding all experts that runs
the W ranks' batches as W micro-batches (fairseq's --update-freq W) and sums the losses.
One exception, by design: BASE's ``--base-shuffle`` (on by default in base_lm, as in
fairseq) first sends every token to a random rank (:mod:`.shuffle`), so in training a rank
routes a random sample of the global batch; the W ranks then equal the same W ranks in
local mode (every rank holding all experts), not the one-process run.

Gradients (fairseq, --ddp-backend legacy_ddp): shared parameters are all-reduced and
divided by W, then fairseq multiplies every gradient by W / (global sample size). An
expert's gradient is not all-reduced, but its backward already sums the contributions of
the tokens of every rank (the reverse all-to-all brings them to the owner), so fairseq's
factor W would scale it W times too large. :func:`make_expert_parallel` registers a hook
dividing expert gradients by W: after fairseq's scaling both kinds of gradient equal the
one-process gradient of the summed loss over the global sample size.

Composition at build time: the layer builder (``moe_plugin.moe_layer.build_moe_layer``,
BASE's ``BaseLayer``) builds only this rank's L experts (``moe_plugin.experts``: per-expert
generators, so they equal the slice of a one-process build) and hands them to
:func:`make_expert_parallel`, which returns the dispatcher; nothing is copied or cut.
"""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

import torch
import torch.nn as nn

from moe_plugin.dispatch.local import DispatchPlan, LocalDispatcher
from moe_plugin.dispatch.placement import ExpertPlacement, traffic_stats
from moe_plugin.dispatch.all_to_all import all_to_all, exchange_counts, exchange_rows
from moe_plugin.dispatch.all_to_all import rank as dist_rank, world_size as dist_world_size

#: the resume stamp of a layer built from scratch (no checkpoint loaded)
FRESH = -1


class RankMismatchError(RuntimeError):
    """Ranks of one expert-parallel run hold state from different checkpoints."""


@dataclasses.dataclass
class SlotPlan:
    """Plan of the slot exchange (one row per routed slot)."""

    local: DispatchPlan  # the local sort of step 1
    send_W: List[int]  # rows sent to each rank
    recv_W: List[int]  # rows received from each rank
    order_R: torch.Tensor  # (source rank, local expert) order -> local-expert order


@dataclasses.dataclass
class TokenPlan:
    """Plan of the token exchange (one row per (token, destination rank) pair, K > 1)."""

    num_tokens: int
    token_P: torch.Tensor  # sender: token of each pair (pairs sorted by destination, then token)
    pair_S: torch.Tensor  # sender: pair of each kept slot
    slot_k_S: torch.Tensor  # sender: slot column k of each kept slot
    send_W: List[int]
    recv_W: List[int]
    num_recv: int  # R received pairs
    row_N: torch.Tensor  # receiver: received pair of each expert row (rows sorted by local expert)
    col_N: torch.Tensor  # receiver: slot column of each expert row


class ExpertParallelDispatcher:
    """Same interface as :class:`LocalDispatcher`; experts ``rank*L .. rank*L+L-1`` live here.

    ``dispatch`` returns the rows for this rank's experts sorted by local expert and the
    counts per local expert (L,); ``combine`` returns this rank's (T, D) outputs.

    Two exchanges (same results, up to the order of float additions):

    * **slots** (K = 1, or ``dedup=False``): every routed slot is one row, the plan of the
      module docstring;
    * **tokens** (K > 1): a token whose K experts include several on one rank travels there
      once. The sender sends one row per (token, destination rank) pair (pairs sorted by
      destination, then token) with the K local expert ids of its slots there (-1 for slots
      elsewhere); the receiver expands the pairs to slot rows for its experts. In combine
      the K combine weights of each pair travel too (a (P, K) all-to-all, differentiable), the
      receiver sums each pair's weighted expert outputs and one row per pair comes back.
      This is what makes SAM's K experts inside one device's group cost one trip there and
      one back, whatever K (SAM, Jiang et al. 2021, abstract). Rows reach each expert in the same order as
      in the slot exchange (source rank, then token).

    ``last_rows_sent`` / ``last_rows_remote``: rows this rank sent in the last dispatch, and
    how many of them went to another rank (detached ints, for benchmarks).

    ``stamp``: the update index of the checkpoint this rank's layer was loaded from
    (:data:`FRESH` when built from scratch). It rides along with the counts exchange, so
    ranks that resumed from different checkpoints (a run killed while some ranks had
    written their shard and others not) fail on the first forward with a clear error on
    every rank instead of training on inconsistent state.
    """

    def __init__(self, num_experts: int, world_size: int, rank: int, group=None, dedup: bool = True):
        self.placement = ExpertPlacement(num_experts, world_size, rank)  # validates E % W
        self.num_experts = num_experts
        self.world_size = world_size
        self.rank = rank
        self.num_local = self.placement.per_rank
        self.group = group
        self.dedup = dedup
        self.local = LocalDispatcher(num_experts)
        self.stamp = FRESH
        self.last_rows_sent = 0
        self.last_rows_remote = 0

    @classmethod
    def for_placement(cls, placement: ExpertPlacement, group=None, dedup: bool = True) -> "ExpertParallelDispatcher":
        return cls(placement.num_experts, placement.world_size, placement.rank, group, dedup)

    @property
    def expert_range(self) -> Tuple[int, int]:
        """[first, stop) global expert ids held by this rank."""
        return self.placement.first, self.placement.stop

    def _exchange_counts(self, counts_WC: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """All-to-all of a (W, C) count table plus the resume stamp -> (received (W, C), stamps (W,))."""
        stamp_W1 = counts_WC.new_full((counts_WC.shape[0], 1), self.stamp)
        recv_WC1 = exchange_counts(torch.cat([counts_WC, stamp_W1], dim=1), self.group)
        return recv_WC1[:, :-1], recv_WC1[:, -1]

    def _check_stamps(self, stamps_W: List[int]) -> None:
        if any(s != self.stamp for s in stamps_W):
            raise RankMismatchError(
                "expert-parallel ranks hold state from different checkpoints (last update index "
                f"per rank, -1 = none loaded: {stamps_W}); the run probably died while some "
                "ranks had written their shard and others had not. Resume every rank from one "
                "complete set: `python -m moe_plugin.tools.reshard --check SAVE_DIR` names the newest "
                "one (pass it with --restore-file), or use scripts/launch_cpu.sh, which does this."
            )

    def _note_traffic(self, send_W: List[int]) -> None:
        self.last_rows_sent = sum(send_W)
        self.last_rows_remote = self.last_rows_sent - send_W[self.rank]

    def traffic_stats(self, expert_ids_TK, valid_T, *, simulated_devices=None, plain_ids_TK=None):
        """The real sends of this rank (:func:`moe_plugin.dispatch.placement.traffic_stats`):
        every token's home is this rank, expert e lives on rank e // L (the router's
        ``simulated_devices`` plays no part)."""
        home_T = torch.full((expert_ids_TK.shape[0],), self.rank, dtype=torch.long, device=expert_ids_TK.device)
        return traffic_stats(expert_ids_TK, home_T, self.placement, valid_T, plain_ids_TK)

    def dispatch(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor):
        if expert_ids_TK.shape[1] > 1 and self.dedup:
            return self._dispatch_tokens(x_TD, expert_ids_TK)
        return self._dispatch_slots(x_TD, expert_ids_TK)

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, plan) -> torch.Tensor:
        if isinstance(plan, TokenPlan):
            return self._combine_tokens(y_ND, weights_TK, plan)
        return self._combine_slots(y_ND, weights_TK, plan)

    # -- slots ---------------------------------------------------------------------------

    def _dispatch_slots(self, x_TD, expert_ids_TK):
        W, L = self.world_size, self.num_local
        x_ND, counts_E, local_plan = self.local.dispatch(x_TD, expert_ids_TK)
        counts_WL = counts_E.view(W, L)  # rank w holds experts w*L .. w*L+L-1 (ExpertPlacement)
        recv_WL, stamps_W = self._exchange_counts(counts_WL)
        # a single host sync for everything the exchange needs
        send_W, recv_W, stamps = torch.stack([counts_WL.sum(1), recv_WL.sum(1), stamps_W]).tolist()
        self._check_stamps(stamps)
        self._note_traffic(send_W)
        # the local dispatcher sorts dropped slots last: only the kept ones travel
        x_RD = all_to_all(x_ND[: sum(send_W)], send_W, recv_W, self.group)
        # received rows are grouped (source rank v, local expert l); sort them by l
        R = x_RD.shape[0]
        block_R = torch.repeat_interleave(
            torch.arange(W * L, device=x_RD.device), recv_WL.reshape(-1), output_size=R
        )
        order_R = torch.argsort(block_R % L, stable=True)
        counts_L = recv_WL.sum(0)
        return x_RD[order_R], counts_L, SlotPlan(local_plan, send_W, recv_W, order_R)

    def _combine_slots(self, y_RD, weights_TK, plan: SlotPlan):
        inverse_R = torch.empty_like(plan.order_R)
        inverse_R[plan.order_R] = torch.arange(plan.order_R.numel(), device=plan.order_R.device)
        y_back_RD = y_RD[inverse_R]  # back to (source rank, local expert) order
        y_ND = all_to_all(y_back_RD, plan.recv_W, plan.send_W, self.group)
        return self.local.combine(y_ND, weights_TK, plan.local)

    # -- tokens (K > 1) ------------------------------------------------------------------

    def _dispatch_tokens(self, x_TD, expert_ids_TK):
        W, L = self.world_size, self.num_local
        T, K = expert_ids_TK.shape
        dev = expert_ids_TK.device
        t_S, k_S = torch.nonzero(expert_ids_TK >= 0, as_tuple=True)  # kept slots, token order
        e_S = expert_ids_TK[t_S, k_S]
        dest_S = self.placement.device_of(e_S)
        # one pair per (destination, token): sorted by destination, then token
        pair_key_P, pair_S = torch.unique(dest_S * T + t_S, sorted=True, return_inverse=True)
        token_P = pair_key_P % T
        dest_P = torch.div(pair_key_P, T, rounding_mode="floor")
        P = pair_key_P.numel()
        local_PK = torch.full((P, K), -1, dtype=torch.long, device=dev)
        local_PK[pair_S, k_S] = self.placement.local(e_S)
        pairs_W = torch.bincount(dest_P, minlength=W)
        recv_W1, stamps_W = self._exchange_counts(pairs_W.view(W, 1))
        send_W, recv_W, stamps = torch.stack([pairs_W, recv_W1[:, 0], stamps_W]).tolist()
        self._check_stamps(stamps)
        self._note_traffic(send_W)
        x_RD = all_to_all(x_TD[token_P], send_W, recv_W, self.group)
        ids_RK = exchange_rows(local_PK, send_W, recv_W, self.group)
        # expand the received pairs to one row per slot, sorted by local expert (stable:
        # within an expert, source rank then token, as in the slot exchange)
        row_N, col_N = torch.nonzero(ids_RK >= 0, as_tuple=True)
        l_N = ids_RK[row_N, col_N]
        order_N = torch.argsort(l_N, stable=True)
        row_N, col_N = row_N[order_N], col_N[order_N]
        counts_L = torch.bincount(l_N, minlength=L)
        plan = TokenPlan(T, token_P, pair_S, k_S, send_W, recv_W, x_RD.shape[0], row_N, col_N)
        return x_RD[row_N], counts_L, plan

    def _combine_tokens(self, y_ND, weights_TK, plan: TokenPlan):
        P = plan.token_P.numel()
        K = weights_TK.shape[1]
        w_S = weights_TK[plan.token_P[plan.pair_S], plan.slot_k_S].to(y_ND.dtype)
        w_PK = y_ND.new_zeros(P, K).index_put((plan.pair_S, plan.slot_k_S), w_S)
        w_RK = all_to_all(w_PK, plan.send_W, plan.recv_W, self.group)
        w_N = w_RK[plan.row_N, plan.col_N]
        y_pair_RD = y_ND.new_zeros(plan.num_recv, y_ND.shape[1]).index_add(0, plan.row_N, y_ND * w_N.unsqueeze(1))
        y_PD = all_to_all(y_pair_RD, plan.recv_W, plan.send_W, self.group)
        out_TD = y_ND.new_zeros(plan.num_tokens, y_ND.shape[1])
        return out_TD.index_add(0, plan.token_P, y_PD)


def group_placement(num_experts: int, group=None) -> ExpertPlacement:
    """This process's placement in torch.distributed's ``group`` (W = 1, rank 0 when not initialised)."""
    return ExpertPlacement(num_experts, dist_world_size(group), dist_rank(group))


def is_expert_parallel(layer) -> bool:
    return isinstance(getattr(layer, "dispatcher", None), ExpertParallelDispatcher)


def make_expert_parallel(experts: nn.Module, placement: ExpertPlacement, group=None) -> ExpertParallelDispatcher:
    """Compose expert parallelism at build time: the dispatcher for a bank built with this
    rank's experts only (``placement.per_rank`` of them, global ids ``placement.first ..``).

    Marks the bank's parameters ``param.expert = True`` (fairseq's legacy_ddp then skips
    their all-reduce and its gradient clipping computes the norm over shared parameters
    only) and divides their gradients by W (see the module docstring). Nothing is copied
    or sliced: a bank holding any other number of experts is an error.
    """
    held = getattr(experts, "num_experts", None)
    if held != placement.per_rank:
        raise ValueError(
            f"expert parallelism: the expert bank holds {held} experts, rank {placement.rank} of "
            f"{placement.world_size} must hold {placement.per_rank}; build the bank for the placement"
        )
    for p in experts.parameters():
        p.expert = True
        if p.requires_grad:
            p.register_hook(_GradScale(1.0 / placement.world_size))
    return ExpertParallelDispatcher.for_placement(placement, group)


class _GradScale:
    """Gradient hook multiplying by a constant (a class, so the model stays deep-copyable)."""

    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.factor
