"""SAM, Switch and Mixture routing (Jiang, Zhan, Qu et al., arXiv 2110.07431, 2021).

Legend: T tokens, D model dim, E experts, G groups, M = E/G experts per group,
K experts activated per token (``--moe-top-k``), W devices (real or simulated), S slots
counted by a balance loss (1 or K).

Sources. Of the paper only the abstract could be read: SAM is a hierarchical router
("Switch and Mixture") that activates several experts per token on the same device, so the
extra experts cost no extra cross-device traffic. The one public implementation is Hetu's
SAM gate (github.com/PKU-DAIR/Hetu: ``python/hetu/layers/SAMGate.py`` with the kernels
``src/ops/SamGroupSum.cu``, ``src/ops/GroupTopKIdx.cu``, ``src/ops/SamMax.cu``), a
third-party implementation, not the authors'. Where moe_plugin's default departs from
Hetu's gate there is an option that gives Hetu's rule, except where Hetu's code
contradicts itself (group indexing for E/G != G, slot offsets for K >= 2, exact ties);
docs/sam.md compares the two formulations and docs/fidelity.md lists every behaviour with
its source.

What SAM computes for every token t:

1. Router in fp32 over all E experts: ``g_t = softmax(x_t W [+ b])``.
2. Switch step: experts form G contiguous groups of M (group j = experts jM .. jM+M-1, so
   with G = number of expert-parallel workers a group is exactly one device's experts);
   ``s_tj = sum_{e in j} g_te``; the token goes to the single group ``j*_t = argmax_j s_tj``.
3. Mixture step: the top-K experts of group j*_t by ``g_te`` (K <= M), slot 0 the best.
4. Combine weights: the router probabilities ``g_te`` of the chosen experts (default, as
   Hetu), or, with ``--sam-renormalize``, those K values divided by their sum.

Because all K experts of a token lie in one group, a token makes exactly one trip to one
device (and one back) whatever K is: the method's point (abstract of the paper).

Degenerate cases (tested): G = 1 is plain top-K over all experts; M = 1 (G = E) is
Switch top-1 with the same ids and weights as ``switch.py`` for the same gate weights.

Capacity: SAM drops like Switch/GShard (and Hetu's gate). Each expert takes at most
``ceil(moe_capacity_factor * K * T / E)`` slots (``--sam-capacity-rounding total``, the
rule of the other softmax routers) or ``K * ceil(moe_capacity_factor * T / E)``
(``per_slot``, Hetu's); ``--moe-eval-capacity-factor`` in eval. The best slot of every
token is served before any second slot (GShard priority); a dropped slot sends nothing and
weighs 0, a token with every slot dropped passes through the residual.
``--moe-capacity-factor inf`` never drops. T counts the non-padding tokens.

Aux losses (unweighted; names as the criterion sees them). Weights come from the
criterion: ``--moe-loss-weights balance_group=w1,balance_expert=w2,align=w3``; a name not
listed there gets ``--moe-aux-loss-weight`` (default 0.01), and ``z`` gets
``--moe-z-loss-weight``.

* ``balance_group``: Switch's loss over groups, ``G * sum_j f_j * P_j``, f_j = fraction of
  tokens whose chosen group is j, P_j = mean of s_tj. 1.0 for uniform routing. (Hetu's
  gate has no group loss: weight it 0 for Hetu's objective.)
* ``balance_expert``: Switch's loss over experts (``--sam-expert-balance``):
  ``in_group`` (default): ``sum_j f_j * M * sum_{e in j} f_{e|j} * P_{e|j}`` with
  f_{e|j} = fraction of group-j tokens whose counted in-group expert is e and
  P_{e|j} = mean over group-j tokens of ``g_te / s_tj``, so every group is balanced on the
  tokens it actually receives. ``global``: Switch's ``E * sum_e f_e P_e`` over all experts
  (Hetu's). Which selected experts count in f (``--sam-balance-slots``): ``first`` (default,
  Switch's f: the best selected expert) or ``all`` (the loss summed over the K slots,
  Hetu's ``l_aux``). With ``first`` both modes are 1.0 for uniform routing and equal
  Switch's loss for G = 1; with ``all`` they are K.
* ``align``: ``sum_{e not in j*_t} max(0, g_te - g_t,(K))`` per token, with g_t,(K) the
  K-th (smallest) selected probability: zero exactly when the chosen group holds the
  global top-K experts. Reduced over tokens by ``--sam-align-reduction``: ``mean`` over the
  non-padding tokens (default) or ``sum`` (Hetu's; the criterion's per-token scaling then
  makes it Hetu's summed loss next to a per-token-mean LM loss). By default the gradient
  flows into the outside experts (down) and into the K-th selected one (up);
  ``--sam-align-detach-kth`` stops the latter (Hetu's ``SamMax`` gradient).
* ``z``: the router z-loss (ST-MoE), as for Switch.

Router: ``--sam-router-bias`` adds a zero-initialised bias (Hetu's gate has one); the
weight's init is the softmax routers' ``--moe-router-init`` (``xavier`` is Hetu's).

Stats (logged per layer as ``moe_l{i}_<name>``): ``tokens_per_expert`` (expert load),
``group_load_max`` / ``group_load_cv`` (tokens per group: max/mean and coefficient of
variation), ``topk_in_group`` (fraction of tokens whose chosen group contains all of the
global top-K experts) and ``top1_in_group`` (... the global top-1), the unweighted losses
as ``loss_balance_group``, ``loss_balance_expert``, ``loss_align``; and the cross-device
traffic, which the dispatcher computes, since it knows the devices (the router declares
``simulated_devices = G`` and returns ``plain_topk_ids_TK``; the MoE layer asks the dispatcher,
``moe_plugin/dispatch/placement.py`` ``traffic_stats``):

* ``xdev_tokens``: tokens this forward sends to another device (each token counts once
  per device it visits other than its own; for SAM at most once);
* ``xdev_frac``: the same per non-padding token;
* ``xdev_slots``: token slots sent to another device by a dispatcher that ships one row
  per slot: K rows per travelling token for SAM, all to one device, so one exchange; a
  dispatcher sending each token once per device (moe_plugin/dispatch/expert_parallel.py
  does for K > 1) sends ``xdev_tokens`` rows;
* ``topk_xdev_frac``: what plain (non-hierarchical) top-K routing of the same
  probabilities would send per token (distinct other devices among the global top-K).

Devices: in expert-parallel runs (the expert-parallel dispatcher) W = world size, a
token's home is this rank and expert e lives on device ``e // (E/W)``, so the figures are
the real sends. Otherwise (the local dispatcher) the figures are simulated with W = G
devices, each group on its own device, and the layer's T rows split into G equal
contiguous blocks, block r living on device r. With data spread at random over devices,
the expected ``xdev_frac`` of SAM is ``(G-1)/G`` whatever the routing; plain top-K pays that
per distinct group among its K experts.

The forward is the softmax routers' one skeleton (``moe_plugin/routing/_softmax.py``);
this file defines the selection (:func:`sam_select`), the capacity rounding, the losses
(pure functions in ``moe_plugin/losses.py``) and the group stats.
"""

from dataclasses import dataclass, field
from typing import Dict

import torch
import torch.nn as nn

from moe_plugin.losses import (
    ALIGN_REDUCTIONS,
    BALANCE_SLOTS,
    EXPERT_BALANCE_MODES,
    alignment_loss,
    expert_balance_loss,
    group_balance_loss,
    group_sums,
)
from moe_plugin.routing._softmax import LinearGateRouter, Selection
from moe_plugin.routing.interface import per_slot_capacity, register_router

CAPACITY_ROUNDINGS = ("total", "per_slot")


@dataclass
class SamOptions:
    sam_groups: int = field(
        default=2,
        metadata={
            "help": "sam: number of expert groups G (contiguous blocks of E/G experts; with expert "
            "parallelism, G = number of workers makes a group one device's experts); E must be "
            "divisible by G and --moe-top-k <= E/G"
        },
    )
    sam_renormalize: bool = field(
        default=False,
        metadata={
            "help": "sam: make the K combine weights of a token sum to one (default: use the raw "
            "router probabilities, as Switch and Hetu's SAM gate do)"
        },
    )
    sam_expert_balance: str = field(
        default="in_group",
        metadata={
            "help": "sam: expert balance loss 'balance_expert': in_group (Switch loss inside each "
            "group on the tokens it receives, weighted by group share) | global (Switch loss over "
            "all E experts, as Hetu's SAM gate)"
        },
    )
    sam_balance_slots: str = field(
        default="first",
        metadata={
            "help": "sam: which selected experts the expert balance loss counts: first (the best "
            "selected expert, Switch's f) | all (every one of the K slots: the loss summed over "
            "slots, as Hetu's SAM gate; K for uniform routing)"
        },
    )
    sam_align_reduction: str = field(
        default="mean",
        metadata={
            "help": "sam: alignment loss 'align' over tokens: mean (over non-padding tokens) | "
            "sum (as Hetu's SAM gate; grows with the batch's token count)"
        },
    )
    sam_align_detach_kth: bool = field(
        default=False,
        metadata={
            "help": "sam: no gradient of the alignment loss into the K-th selected expert's "
            "probability (as Hetu's SAM gate); default: it is pushed up as the outside ones go down"
        },
    )
    sam_router_bias: bool = field(
        default=False,
        metadata={
            "help": "sam: add a learned zero-initialised bias to the router logits, g = softmax(xW + b), "
            "as Hetu's SAM gate (default: no bias, as the Switch router)"
        },
    )
    sam_capacity_rounding: str = field(
        default="total",
        metadata={
            "help": "sam: capacity per expert: total = ceil(factor*K*T/E) (as the other softmax "
            "routers) | per_slot = K*ceil(factor*T/E) (as Hetu's SAM gate)"
        },
    )


def sam_select(probs_TE: torch.Tensor, num_groups: int, top_k: int, renormalize: bool = False):
    """The switch and mixture steps on router probabilities.

    Returns (group_T, expert_ids_TK, weights_TK): the chosen group (argmax of the group
    sums, lowest index on ties), the top-K experts inside it by probability (slot 0 the
    best) and their combine weights (the probabilities, or those divided by their sum).
    """
    T, E = probs_TE.shape
    G, K = num_groups, top_k
    M = E // G
    group_T = group_sums(probs_TE, G).argmax(dim=-1)
    in_group_TM = probs_TE.reshape(T, G, M)[torch.arange(T, device=probs_TE.device), group_T]
    weights_TK, local_TK = in_group_TM.topk(K, dim=-1)
    expert_ids_TK = group_T.unsqueeze(-1) * M + local_TK
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp(min=torch.finfo(weights_TK.dtype).tiny)
    return group_T, expert_ids_TK, weights_TK


def _check_choice(cfg, name: str, allowed) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise ValueError(f"--{name.replace('_', '-')}: {value!r} is not allowed; allowed: {', '.join(allowed)}")


@register_router(
    "sam",
    options=SamOptions,
    arch="sam_lm",
    arch_defaults={"moe_top_k": 2, "sam_groups": 2},
)
class SamRouter(LinearGateRouter):
    """Switch-and-Mixture hierarchical router (see the module docstring)."""

    def __init__(self, cfg, model_dim: int, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        self.top_k = cfg.moe_top_k
        self.num_groups = cfg.sam_groups
        self.experts_per_group = self.num_experts // self.num_groups
        #: the local dispatcher reports cross-device traffic as if each group were a device
        self.simulated_devices = self.num_groups
        self.renormalize = bool(cfg.sam_renormalize)
        self.expert_balance = cfg.sam_expert_balance
        self.balance_slots = cfg.sam_balance_slots
        self.align_reduction = cfg.sam_align_reduction
        self.align_detach_kth = bool(cfg.sam_align_detach_kth)
        self.capacity_rounding = cfg.sam_capacity_rounding
        self.gate_bias = nn.Parameter(torch.zeros(self.num_experts)) if cfg.sam_router_bias else None

    @staticmethod
    def validate(cfg) -> None:
        E, G, K = cfg.moe_expert_count, cfg.sam_groups, cfg.moe_top_k
        if not cfg.moe_gating_use_fp32:
            raise ValueError(
                "--moe-no-gating-fp32: not allowed for the sam router; its router logits and softmax "
                "are always fp32 (the group sums and the alignment loss compare probabilities)"
            )
        if G < 1 or E % G != 0:
            raise ValueError(
                f"--sam-groups: {G} is not allowed with --moe-expert-count {E}; "
                f"allowed: a divisor of {E} (groups are contiguous blocks of E/G experts)"
            )
        if not 1 <= K <= E // G:
            raise ValueError(
                f"--moe-top-k: {K} is not allowed for the sam router with {E} experts in {G} groups; "
                f"allowed: 1..{E // G} (the K experts are chosen inside one group of E/G)"
            )
        _check_choice(cfg, "sam_expert_balance", EXPERT_BALANCE_MODES)
        _check_choice(cfg, "sam_balance_slots", BALANCE_SLOTS)
        _check_choice(cfg, "sam_align_reduction", ALIGN_REDUCTIONS)
        _check_choice(cfg, "sam_capacity_rounding", CAPACITY_ROUNDINGS)
        if not 0.0 <= getattr(cfg, "moe_jitter_eps", 0.0) < 1.0:
            raise ValueError(f"--moe-jitter-eps: {cfg.moe_jitter_eps} is not allowed; allowed: 0 <= eps < 1")

    # --- the skeleton's hooks (moe_plugin/routing/_softmax.py) ----------------------------
    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits_TE = super().logits(x_TD).float()  # the softmax is always fp32
        if self.gate_bias is not None:
            logits_TE = logits_TE + self.gate_bias.float()
        return logits_TE

    def select(self, probs_TE, logits_TE, top_k) -> Selection:
        group_T, expert_ids_TK, weights_TK = sam_select(probs_TE, self.num_groups, top_k, self.renormalize)
        # what plain (non-hierarchical) top-K of the same probabilities would choose: the
        # dispatcher's traffic statistics compare against it (topk_xdev_frac)
        plain_TK = probs_TE.detach().topk(top_k, dim=-1).indices
        # the K-th selected probability (always the raw one, whatever the combine weights)
        kth_T = probs_TE.gather(1, expert_ids_TK[:, -1:]).squeeze(1)
        return Selection(expert_ids_TK, weights_TK, {"group_T": group_T, "kth_T": kth_T}, plain_topk_ids_TK=plain_TK)

    def capacity_rule(self, num_tokens, num_experts, top_k, factor):
        rule = per_slot_capacity if self.capacity_rounding == "per_slot" else super().capacity_rule
        return rule(num_tokens, num_experts, top_k, factor)

    def balance_losses(self, probs_TE, chosen_TK, valid_T, sel) -> Dict[str, torch.Tensor]:
        G, group_T = self.num_groups, sel.extras["group_T"]
        return {
            "balance_group": group_balance_loss(probs_TE, group_T, G, valid_T),
            "balance_expert": expert_balance_loss(
                probs_TE, group_T, chosen_TK, G, valid_T, self.expert_balance, self.balance_slots
            ),
            "align": alignment_loss(
                probs_TE, group_T, sel.extras["kth_T"], G, valid_T, self.align_reduction, self.align_detach_kth
            ),
        }

    def extra_stats(self, probs_TE, chosen_TK, routed_TK, valid_T, sel, aux) -> Dict[str, torch.Tensor]:
        G, M = self.num_groups, self.experts_per_group
        group_T = sel.extras["group_T"]
        n = valid_T.sum().clamp(min=1).float()
        per_group_G = torch.bincount(group_T, weights=valid_T.float(), minlength=G)  # no nonzero()
        mean_g = per_group_G.mean().clamp(min=1e-9)
        in_group_TK = torch.div(sel.plain_topk_ids_TK, M, rounding_mode="floor") == group_T.unsqueeze(-1)
        stats = {
            "group_load_max": per_group_G.max() / mean_g,
            "group_load_cv": per_group_G.std(unbiased=False) / mean_g,
            "topk_in_group": (in_group_TK.all(-1) & valid_T).sum().float() / n,
            "top1_in_group": (in_group_TK[:, 0] & valid_T).sum().float() / n,
        }
        stats.update({f"loss_{k}": v.detach() for k, v in aux.items() if k != "z"})
        return stats
