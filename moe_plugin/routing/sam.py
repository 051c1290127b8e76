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
as ``loss_balance_group``, ``loss_balance_expert``, ``loss_align``, and the cross-device
traffic:

* ``xdev_tokens``: tokens this forward sends to another device (each token counts once
  per device it visits other than its own; for SAM at most once);
* ``xdev_frac``: the same per non-padding token;
* ``xdev_slots``: token slots sent to another device by a dispatcher that ships one row
  per slot (moe_plugin/dispatch/expert_parallel.py does): K rows per travelling token for SAM, all to one
  device, so one exchange; a dispatcher sending each token once per device would send
  ``xdev_tokens`` rows;
* ``topk_xdev_frac``: what plain (non-hierarchical) top-K routing of the same
  probabilities would send per token (distinct other devices among the global top-K).

Devices: in expert-parallel runs (``--moe-expert-parallel`` with torch.distributed up)
W = world size, a token's home is this rank and expert e lives on device ``e // (E/W)``,
so the figures are the real sends. Otherwise the figures are simulated with W = G devices,
each group on its own device, and the layer's T rows split into G equal contiguous blocks,
block r living on device r. With data spread at random over devices, the expected
``xdev_frac`` of SAM is ``(G-1)/G`` whatever the routing; plain top-K pays that per distinct
group among its K experts.

For the expert-parallel dispatcher: ``group_of(expert_ids)``, ``experts_per_group`` and,
after each forward, ``last_group_T`` (chosen group per token, -1 for padding, detached).
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn as nn

from moe_plugin.routing.interface import (
    DROPPED,
    RouterOutput,
    TokenInfo,
    apply_capacity,
    register_router,
    router_z_loss,
    routing_entropy,
    tokens_per_expert,
)
from moe_plugin.routing.softmax_topk import LinearGateRouter

EXPERT_BALANCE_MODES = ("in_group", "global")
BALANCE_SLOTS = ("first", "all")
ALIGN_REDUCTIONS = ("mean", "sum")
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


# ----------------------------------------------------------------------------------------
# Pure functions (probabilities in, selection / losses / metrics out); the router and the
# tests both use them.
# ----------------------------------------------------------------------------------------


def sam_select(probs_TE: torch.Tensor, num_groups: int, top_k: int, renormalize: bool = False):
    """The switch and mixture steps on router probabilities.

    Returns (group_T, expert_ids_TK, weights_TK): the chosen group (argmax of the group
    sums, lowest index on ties), the top-K experts inside it by probability (slot 0 the
    best) and their combine weights (the probabilities, or those divided by their sum).
    """
    T, E = probs_TE.shape
    G, K = num_groups, top_k
    M = E // G
    probs_TGM = probs_TE.reshape(T, G, M)
    s_TG = probs_TGM.sum(-1)
    group_T = s_TG.argmax(dim=-1)
    in_group_TM = probs_TGM[torch.arange(T, device=probs_TE.device), group_T]
    weights_TK, local_TK = in_group_TM.topk(K, dim=-1)
    expert_ids_TK = group_T.unsqueeze(-1) * M + local_TK
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp(min=torch.finfo(weights_TK.dtype).tiny)
    return group_T, expert_ids_TK, weights_TK


def per_slot_capacity(num_tokens, num_experts: int, top_k: int, factor: float):
    """``K * ceil(factor * T / E)`` (Hetu's SAM gate: ``k * ceil((T / E) * capacity_factor)``).

    Like :func:`moe_plugin.routing.interface.capacity`, ``num_tokens`` may be a 0-dim
    tensor (no host sync; the result is then a tensor equal to the int formula);
    ``factor = inf`` means no limit (K * T).
    """
    if isinstance(num_tokens, torch.Tensor):
        n = num_tokens.to(torch.float64)
        per_slot = n if math.isinf(factor) else torch.ceil(n / num_experts * factor)
        return (per_slot.clamp(min=1) * top_k).long()
    if math.isinf(factor):
        return max(num_tokens, 1) * top_k
    return max(int(math.ceil(num_tokens / num_experts * factor)), 1) * top_k


def _mean_over(values_T: torch.Tensor, valid_T: torch.Tensor) -> torch.Tensor:
    w_T = valid_T.to(values_T.dtype)
    return (values_T * w_T).sum() / w_T.sum().clamp(min=1.0)


def group_balance_loss(probs_TE: torch.Tensor, group_T: torch.Tensor, num_groups: int, valid_T: torch.Tensor):
    """``G * sum_j f_j P_j`` (Switch's eq. 4 over groups); f detached, P differentiable."""
    T, E = probs_TE.shape
    G = num_groups
    s_TG = probs_TE.reshape(T, G, E // G).sum(-1)
    w_T = valid_T.to(probs_TE.dtype)
    n = w_T.sum().clamp(min=1.0)
    f_G = torch.zeros(G, dtype=probs_TE.dtype, device=probs_TE.device).index_add_(0, group_T, w_T) / n
    P_G = (s_TG * w_T.unsqueeze(-1)).sum(0) / n
    return G * (f_G.detach() * P_G).sum()


def expert_balance_loss(
    probs_TE: torch.Tensor,
    group_T: torch.Tensor,
    counted_ids: torch.Tensor,
    num_groups: int,
    valid_T: torch.Tensor,
    mode: str = "in_group",
):
    """Switch-style balance over experts (see the module docstring for the two modes).

    counted_ids: (T,) or (T, S) the selected experts each token counts in f (before
    capacity; all in the token's chosen group): slot 0 for Switch's f, all K slots for
    Hetu's summed loss. The loss is linear in f, so S columns give the sum of the S
    single-slot losses.
    in_group: ``sum_j f_j M sum_{e in j} f_{e|j} P_{e|j}``, computed per token as
    ``M * mean_t sum_{e in j*_t} f_{e|j*_t} g_te / s_t,j*_t``.
    """
    T, E = probs_TE.shape
    ids_TS = counted_ids.reshape(T, -1)
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
    chosen_TM = probs_TGM[rows, group_T]  # g_te of the chosen group's experts
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
):
    """``sum_{e not in j*_t} max(0, g_te - g_t,(K))`` per token, then mean or sum over tokens.

    kth_T: the K-th (smallest) selected probability of each token (pass it detached for
    Hetu's gradient). ``sum`` is Hetu's ``l_alignment`` (padding excluded).
    """
    T, E = probs_TE.shape
    M = E // num_groups
    outside_TE = (torch.arange(E, device=probs_TE.device) // M).unsqueeze(0) != group_T.unsqueeze(-1)
    excess_TE = torch.relu(probs_TE - kth_T.unsqueeze(-1)) * outside_TE.to(probs_TE.dtype)
    if reduction == "sum":
        return (excess_TE.sum(-1) * valid_T.to(probs_TE.dtype)).sum()
    return _mean_over(excess_TE.sum(-1), valid_T)


def device_visits(expert_ids_TK: torch.Tensor, home_T: torch.Tensor, experts_per_device: int, num_devices: int):
    """(T,) number of distinct devices other than the token's home among its experts (ids < 0 ignored)."""
    T, K = expert_ids_TK.shape
    kept_TK = expert_ids_TK >= 0
    dev_TK = torch.div(expert_ids_TK.clamp(min=0), experts_per_device, rounding_mode="floor")
    visits_TW = torch.zeros(T, num_devices, dtype=torch.bool, device=expert_ids_TK.device)
    visits_TW.scatter_(1, torch.where(kept_TK, dev_TK, home_T.unsqueeze(-1).expand(T, K)), True)
    visits_TW[torch.arange(T, device=expert_ids_TK.device), home_T] = False
    return visits_TW.sum(-1)


# ----------------------------------------------------------------------------------------


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
        self.renormalize = bool(cfg.sam_renormalize)
        self.expert_balance = cfg.sam_expert_balance
        self.balance_slots = cfg.sam_balance_slots
        self.align_reduction = cfg.sam_align_reduction
        self.align_detach_kth = bool(cfg.sam_align_detach_kth)
        self.capacity_rounding = cfg.sam_capacity_rounding
        self.expert_parallel = bool(getattr(cfg, "moe_expert_parallel", False))
        self.gate_bias = nn.Parameter(torch.zeros(self.num_experts)) if cfg.sam_router_bias else None
        #: chosen group per token of the last forward (-1 = padding), for the dispatcher / tests
        self.last_group_T: Optional[torch.Tensor] = None

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

    def group_of(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Group of each expert id (contiguous blocks of ``experts_per_group``); -1 stays -1."""
        g = torch.div(expert_ids.clamp(min=0), self.experts_per_group, rounding_mode="floor")
        return torch.where(expert_ids >= 0, g, torch.full_like(g, DROPPED))

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits_TE = super().logits(x_TD).float()  # the softmax is always fp32
        if self.gate_bias is not None:
            logits_TE = logits_TE + self.gate_bias.float()
        return logits_TE

    def capacity_for(self, num_valid):
        if self.capacity_rounding == "total":
            return super().capacity_for(num_valid)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return per_slot_capacity(num_valid, self.num_experts, self.top_k, factor)

    def _devices(self, T: int, device):
        """(home_T, experts per device, number of devices): real in expert-parallel runs, else simulated."""
        E = self.num_experts
        if self.expert_parallel and torch.distributed.is_available() and torch.distributed.is_initialized():
            W = torch.distributed.get_world_size()
            if E % W == 0:
                home_T = torch.full((T,), torch.distributed.get_rank(), dtype=torch.long, device=device)
                return home_T, E // W, W
        G = self.num_groups
        home_T = torch.div(torch.arange(T, device=device) * G, max(T, 1), rounding_mode="floor")
        return home_T, self.experts_per_group, G

    def forward(self, x_TD: torch.Tensor, *, tokens: Optional[TokenInfo] = None) -> RouterOutput:
        T = x_TD.shape[0]
        E, G, K = self.num_experts, self.num_groups, self.top_k
        valid_T = ~tokens.pad_mask_T if tokens is not None else torch.ones(T, dtype=torch.bool, device=x_TD.device)
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        group_T, expert_ids_TK, weights_TK = sam_select(probs_TE, G, K, self.renormalize)
        # K-th selected probability (always the raw one, whatever the combine weights)
        kth_T = probs_TE.gather(1, expert_ids_TK[:, -1:]).squeeze(1)
        if self.align_detach_kth:
            kth_T = kth_T.detach()

        # padding is not routed; capacity as Switch/GShard (best slots first)
        expert_ids_TK = expert_ids_TK.masked_fill(~valid_T.unsqueeze(-1), DROPPED)
        num_valid = valid_T.sum() if tokens is not None else T  # a tensor: no host sync
        routed_TK = apply_capacity(expert_ids_TK, E, self.capacity_for(num_valid))
        weights_TK = weights_TK * (routed_TK >= 0).to(weights_TK.dtype)

        counted = expert_ids_TK[:, :1] if self.balance_slots == "first" else expert_ids_TK
        aux: Dict[str, torch.Tensor] = {
            "balance_group": group_balance_loss(probs_TE, group_T, G, valid_T),
            "balance_expert": expert_balance_loss(
                probs_TE, group_T, counted.clamp(min=0), G, valid_T, self.expert_balance
            ),
            "align": alignment_loss(probs_TE, group_T, kth_T, G, valid_T, self.align_reduction),
            "z": router_z_loss(logits_TE, valid_T),
        }
        self.last_group_T = torch.where(valid_T, group_T, torch.full_like(group_T, DROPPED)).detach()
        stats = self._stats(probs_TE.detach(), group_T, expert_ids_TK, routed_TK, valid_T)
        stats.update({f"loss_{k}": v.detach() for k, v in aux.items() if k != "z"})
        return RouterOutput(routed_TK, weights_TK.to(x_TD.dtype), aux, stats)

    @torch.no_grad()
    def _stats(self, probs_TE, group_T, expert_ids_TK, routed_TK, valid_T) -> Dict[str, torch.Tensor]:
        T = probs_TE.shape[0]
        G, K, M = self.num_groups, self.top_k, self.experts_per_group
        n = valid_T.sum().clamp(min=1).float()
        want = (expert_ids_TK >= 0).sum()
        got = (routed_TK >= 0).sum()
        per_group_G = torch.bincount(group_T, weights=valid_T.float(), minlength=G)  # no nonzero()
        mean_g = per_group_G.mean().clamp(min=1e-9)
        global_TK = probs_TE.topk(K, dim=-1).indices
        in_group_TK = torch.div(global_TK, M, rounding_mode="floor") == group_T.unsqueeze(-1)
        home_T, per_device, W = self._devices(T, probs_TE.device)
        sam_visits_T = device_visits(routed_TK, home_T, per_device, W)
        dev_TK = torch.div(routed_TK.clamp(min=0), per_device, rounding_mode="floor")
        xdev_slots = ((routed_TK >= 0) & (dev_TK != home_T.unsqueeze(-1))).sum().float()
        topk_visits_T = device_visits(global_TK.masked_fill(~valid_T.unsqueeze(-1), DROPPED), home_T, per_device, W)
        return {
            "tokens_per_expert": tokens_per_expert(routed_TK, self.num_experts),
            "dropped_frac": (want - got).float() / want.clamp(min=1).float(),
            "entropy": routing_entropy(probs_TE, valid_T),
            "group_load_max": per_group_G.max() / mean_g,
            "group_load_cv": per_group_G.std(unbiased=False) / mean_g,
            "topk_in_group": (in_group_TK.all(-1) & valid_T).sum().float() / n,
            "top1_in_group": (in_group_TK[:, 0] & valid_T).sum().float() / n,
            "xdev_tokens": sam_visits_T.sum().float(),
            "xdev_frac": sam_visits_T.sum().float() / n,
            "xdev_slots": xdev_slots,
            "topk_xdev_frac": topk_visits_T.sum().float() / n,
        }
