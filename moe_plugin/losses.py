"""The routers' auxiliary losses (and the routing entropy), as pure functions.

Shape legend: T tokens (padding included), E experts, G expert groups (SAM), M = E/G experts
per group, K selected experts per token, S slots counted by a balance loss (1 or K).

Every function takes router probabilities or logits and a ``valid_T`` mask (False for
padding rows, which take no part) and returns a 0-dim tensor, differentiable where the
formula is (the fractions ``f`` of tokens are counts: they carry no gradient). No module
state, no fairseq, no reading back from the device. The routers (``moe_plugin/routing``)
call them; the criterion weights the results by name.
"""

from __future__ import annotations

import torch

#: ``--sam-expert-balance`` values (:func:`expert_balance_loss`)
EXPERT_BALANCE_MODES = ("in_group", "global")
#: ``--sam-balance-slots`` values (:func:`expert_balance_loss`)
BALANCE_SLOTS = ("first", "all")
#: ``--sam-align-reduction`` values (:func:`alignment_loss`)
ALIGN_REDUCTIONS = ("mean", "sum")


def _mean_over(values_T: torch.Tensor, valid_T: torch.Tensor) -> torch.Tensor:
    """Mean of ``values_T`` over the valid rows (0 when there are none)."""
    w_T = valid_T.to(values_T.dtype)
    return (values_T * w_T).sum() / w_T.sum().clamp(min=1.0)


def switch_balance_loss(
    probs_TE: torch.Tensor, top1_T: torch.Tensor, valid_T: torch.Tensor, f_E: "torch.Tensor | None" = None
) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``E * sum_e f_e * P_e`` (Fedus, Zoph, Shazeer
    2021, "Switch Transformers", eqs. 4-6).

    f_e: fraction of valid tokens whose first choice (``top1_T``, before capacity dropping)
    is e, no gradient (or the given ``f_E``: the global batch's, ``--moe-balance-scope``);
    P_e: mean router probability of e over valid tokens. Equals 1.0 for uniform routing.
    """
    E = probs_TE.shape[-1]
    w_T = valid_T.to(probs_TE.dtype)
    n = w_T.sum().clamp(min=1.0)
    if f_E is None:
        f_E = torch.zeros(E, dtype=probs_TE.dtype, device=probs_TE.device).index_add_(0, top1_T, w_T) / n
    f_E = f_E.to(probs_TE.dtype)
    P_E = (probs_TE * w_T.unsqueeze(-1)).sum(0) / n
    return E * (f_E.detach() * P_E).sum()


def router_z_loss(logits_TE: torch.Tensor, valid_T: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean_t (log sum_e exp(logit_te))^2`` over valid tokens (Zoph et al.
    2022, "ST-MoE", eq. 5)."""
    z_T = torch.logsumexp(logits_TE, dim=-1).pow(2)
    return _mean_over(z_T, valid_T)


def routing_entropy(probs_TE: torch.Tensor, valid_T: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) ``-sum_e p_te log p_te`` of the router distribution over valid
    tokens (a statistic, not a training loss)."""
    ent_T = -(probs_TE * torch.log(probs_TE.clamp(min=1e-9))).sum(-1)
    return _mean_over(ent_T, valid_T)


# ----------------------------------------------------------------------------------------
# SAM (Switch and Mixture, Jiang, Zhan, Qu et al., arXiv 2110.07431): the paper's body is
# not available (only its abstract); the formulas follow moe_plugin/routing/sam.py's
# docstring, and the Hetu options reproduce Hetu's SAM gate
# (PKU-DAIR/Hetu python/hetu/layers/SAMGate.py, src/ops/SamMax.cu). docs/sam.md compares them.
# ----------------------------------------------------------------------------------------


def group_sums(probs_TE: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``s_tj = sum_{e in group j} p_te`` (T, G); groups are contiguous blocks of E/G experts."""
    T, E = probs_TE.shape
    return probs_TE.reshape(T, num_groups, E // num_groups).sum(-1)


def group_balance_loss(probs_TE: torch.Tensor, group_T: torch.Tensor, num_groups: int, valid_T: torch.Tensor):
    """SAM's group balance ``G * sum_j f_j P_j``: Switch's eq. 4 with the G groups as experts.

    f_j: fraction of valid tokens whose chosen group (``group_T``) is j, no gradient; P_j:
    mean over valid tokens of the group sum ``s_tj``. 1.0 for uniform routing.
    """
    G = num_groups
    s_TG = group_sums(probs_TE, G)
    w_T = valid_T.to(probs_TE.dtype)
    n = w_T.sum().clamp(min=1.0)
    f_G = torch.zeros(G, dtype=probs_TE.dtype, device=probs_TE.device).index_add_(0, group_T, w_T) / n
    P_G = (s_TG * w_T.unsqueeze(-1)).sum(0) / n
    return G * (f_G.detach() * P_G).sum()


def expert_balance_loss(
    probs_TE: torch.Tensor,
    group_T: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    num_groups: int,
    valid_T: torch.Tensor,
    mode: str = "in_group",
    slots: str = "first",
):
    """SAM's expert balance: Switch's eq. 4 over experts, in one of two forms.

    expert_ids_TK: the selected experts of each token (before capacity; all in the token's
    chosen group), slot 0 the best; ids < 0 (padding) count nothing. ``slots`` (option
    ``--sam-balance-slots``): ``first`` counts slot 0 (Switch's f), ``all`` counts all K
    slots, which is the sum of the K single-slot losses since the loss is linear in f
    (Hetu's summed loss; K for uniform routing).

    ``mode`` (``--sam-expert-balance``):

    * ``in_group``: ``sum_j f_j M sum_{e in j} f_{e|j} P_{e|j}``, with f_{e|j} the share of
      e among the counted slots of the tokens routed to group j and P_{e|j} the mean of
      ``p_te / s_tj`` over those tokens: every group balanced on the tokens it receives.
      Computed per token as ``M * mean_t sum_{e in j*_t} f_{e|j*_t} p_te / s_t,j*_t``.
    * ``global``: ``E * sum_e f_e P_e`` over all E experts (Hetu's ``balance_loss``).
    """
    if mode not in EXPERT_BALANCE_MODES:
        raise ValueError(f"--sam-expert-balance: {mode!r} is not allowed; allowed: {', '.join(EXPERT_BALANCE_MODES)}")
    if slots not in BALANCE_SLOTS:
        raise ValueError(f"--sam-balance-slots: {slots!r} is not allowed; allowed: {', '.join(BALANCE_SLOTS)}")
    T, E = probs_TE.shape
    ids_TS = (expert_ids_TK[:, :1] if slots == "first" else expert_ids_TK).clamp(min=0)
    S = ids_TS.shape[1]
    w_T = valid_T.to(probs_TE.dtype)
    n = w_T.sum().clamp(min=1.0)
    counts_E = torch.zeros(E, dtype=probs_TE.dtype, device=probs_TE.device).index_add_(
        0, ids_TS.reshape(-1), w_T.unsqueeze(1).expand(T, S).reshape(-1)
    )
    if mode == "global":
        P_E = (probs_TE * w_T.unsqueeze(-1)).sum(0) / n
        return E * ((counts_E / n).detach() * P_E).sum()
    G = num_groups
    M = E // G
    # f_{e|j}: share of e among the tokens routed to e's group (per counted slot)
    per_group_G = torch.zeros(G, dtype=probs_TE.dtype, device=probs_TE.device).index_add_(0, group_T, w_T)
    f_in_E = (counts_E.reshape(G, M) / per_group_G.clamp(min=1.0).unsqueeze(-1)).reshape(E).detach()
    probs_TGM = probs_TE.reshape(T, G, M)
    rows = torch.arange(T, device=probs_TE.device)
    chosen_TM = probs_TGM[rows, group_T]  # p_te of the chosen group's experts
    q_TM = chosen_TM / chosen_TM.sum(-1, keepdim=True).clamp(min=torch.finfo(probs_TE.dtype).tiny)
    f_TM = f_in_E.reshape(G, M)[group_T]
    return M * _mean_over((f_TM * q_TM).sum(-1), valid_T)


def alignment_loss(
    probs_TE: torch.Tensor,
    group_T: torch.Tensor,
    kth_T: torch.Tensor,
    num_groups: int,
    valid_T: torch.Tensor,
    reduction: str = "mean",
    detach_kth: bool = False,
):
    """SAM's alignment ``sum_{e not in j*_t} max(0, p_te - p_t,(K))`` per token: zero exactly
    when the chosen group j*_t holds the global top-K experts (Hetu's ``SamMax``).

    kth_T: p_t,(K), the probability of each token's K-th (smallest) selected expert.
    ``reduction`` (``--sam-align-reduction``): ``mean`` over valid tokens, or ``sum`` (Hetu's
    ``l_alignment``). ``detach_kth`` (``--sam-align-detach-kth``): no gradient into p_t,(K)
    (Hetu's ``SamMax`` gradient); by default it is pushed up as the outside probabilities
    are pushed down.
    """
    if reduction not in ALIGN_REDUCTIONS:
        raise ValueError(f"--sam-align-reduction: {reduction!r} is not allowed; allowed: {', '.join(ALIGN_REDUCTIONS)}")
    T, E = probs_TE.shape
    M = E // num_groups
    if detach_kth:
        kth_T = kth_T.detach()
    outside_TE = (torch.arange(E, device=probs_TE.device) // M).unsqueeze(0) != group_T.unsqueeze(-1)
    excess_TE = torch.relu(probs_TE - kth_T.unsqueeze(-1)) * outside_TE.to(probs_TE.dtype)
    if reduction == "sum":
        return (excess_TE.sum(-1) * valid_T.to(probs_TE.dtype)).sum()
    return _mean_over(excess_TE.sum(-1), valid_T)
