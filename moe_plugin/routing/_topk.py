"""Top-K softmax routing with a scheduled K, shared by HyperRouter and SMoE-Dropout.

Shape legend:
  T  tokens in the flattened batch     D  model dimension
  E  experts in the layer              K  experts activated per token (the K in use)

Routing (HyperRouter, Do et al. 2023, arXiv 2312.07035, Sec. 3; SMoE-Dropout, Chen et al.
ICLR 2023; both as in the reference FastMoE gates): ``logits_TE = router(x_TD)``; the K
largest logits of each token pick its experts; the combine weights are a softmax over
those K logit values only (not the K largest probabilities of a softmax over all E):
``w_tk = exp(l_tk) / sum_j exp(l_tj)`` for the chosen k. ``y_t = sum_k w_tk f_{e_tk}(x_t)``.

The K in use (``router.top_k``, which ``moe_plugin.utils.param_counts`` reads):
  * evaluation (``model.eval()``) with ``--moe-eval-top-k N`` > 0: N. fairseq-eval-lm takes
    it without retraining: ``--model-overrides "{'moe_eval_top_k': N}"``;
  * otherwise, with ``--moe-top-k-schedule`` other than ``none``: the schedule's value at
    the current update count (:func:`scheduled_top_k`);
  * otherwise ``--moe-top-k``.
So evaluation with ``--moe-eval-top-k 0`` uses the K that training reached (below).

The update count comes from fairseq, which calls ``set_num_updates(n)`` on every submodule
that defines it: before each training forward (``FairseqTask.train_step``, n = updates
done so far) and when loading a checkpoint (trainer and ``load_model_ensemble``). The
router also keeps it in a buffer (``num_updates``, in the ``state_dict``): after training
it holds the count of the last training forward, one less than the checkpoint's
``num_updates`` (fairseq calls ``set_num_updates`` before each forward, not after the last
update). fairseq's loaders (``load_model_ensemble``, the trainer) call
``set_num_updates(checkpoint count)`` *before* ``load_state_dict``, so the buffer wins:
evaluation with ``--moe-eval-top-k 0`` uses the K of the last training forward, the same
K as fairseq-train's own validation after that update, and a resumed fairseq-train sets the
right count again before its first forward.

Capacity: the reference FastMoE code never drops tokens, so both archs default to
``--moe-capacity-factor inf --moe-eval-capacity-factor inf`` (no dropping, every token gets
exactly K experts). A finite factor is honoured: capacity ``ceil(factor * K * T / E)``
with GShard's priority (every token's first choice before any second choice);
dropped slots have weight 0 and the residual carries the token.

Aux losses (unweighted; the criterion weights them): ``z`` (router z-loss, weight
``--moe-z-loss-weight``, 0 by default) always; ``balance`` (Switch ``E sum f_e P_e`` over
first choices) only where a subclass enables it (HyperRouter ``--hyper-balance-loss``),
since neither method uses one. Extra stat ``top_k`` (the K in use) is logged per layer as
``moe_l{i}_top_k``.
"""

import math
from dataclasses import dataclass, field
from typing import List, Optional

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

SCHEDULES = ("none", "linear", "cosine", "exponential", "multistep")

#: rate of the exponential schedule: the reference raises K as
#: ``K_max - (K_max - K_min) * 0.99 ** (300 * p)`` (p = fraction of the schedule done), i.e.
#: ``exp(-r p)`` with r = 300 ln(1/0.99) ~= 3.015; we use the same curve normalised so that
#: it reaches K_max exactly at p = 1.
EXP_RATE = 300.0 * math.log(1.0 / 0.99)


@dataclass
class TopKScheduleOptions:
    """Options shared by the ``hyper`` and ``smoe_dropout`` routers (registered once, by ``hyper``)."""

    moe_top_k_schedule: str = field(
        default="none",
        metadata={
            "help": "hyper/smoe_dropout: training top-K schedule from --moe-top-k-min to "
            "--moe-top-k-max over --moe-top-k-schedule-updates updates: none (K = --moe-top-k) | "
            "linear | cosine | exponential | multistep"
        },
    )
    moe_top_k_min: int = field(default=1, metadata={"help": "hyper/smoe_dropout: K at update 0 of the schedule"})
    moe_top_k_max: int = field(
        default=0, metadata={"help": "hyper/smoe_dropout: K at the end of the schedule; 0 = all experts"}
    )
    moe_top_k_schedule_updates: int = field(
        default=0,
        metadata={"help": "hyper/smoe_dropout: updates over which K moves from min to max (required with a schedule)"},
    )
    moe_eval_top_k: int = field(
        default=0,
        metadata={
            "help": "hyper/smoe_dropout: K in evaluation; 0 = the training K reached "
            "(fairseq-eval-lm: --model-overrides \"{'moe_eval_top_k': 2}\")"
        },
    )
    moe_frozen_router_seed: int = field(
        default=1,
        metadata={
            "help": "hyper/smoe_dropout: seed of the frozen router parts (hypernetwork, "
            "random gate) and the HyperRouter embedding, combined with the layer index; "
            "independent of --seed"
        },
    )


def _round_half_up(v: float) -> int:
    # deterministic rounding (Python's round() is round-half-even)
    return int(math.floor(v + 0.5))


def multistep_stages(k_min: int, k_max: int) -> List[int]:
    """K values of the multistep schedule: k_min, 2 k_min, 4 k_min, ... (< k_max), then k_max.

    The reference's multi-step schedule is 1, 2, 4, 8, 16 in equal stages (E = 16); this is
    the same doubling sequence for any range.
    """
    stages = []
    k = k_min
    while k < k_max:
        stages.append(k)
        k *= 2
    stages.append(k_max)
    return stages


def scheduled_top_k(mode: str, k_min: int, k_max: int, total_updates: int, num_updates: int) -> int:
    """K after ``num_updates`` updates; p = clamp(num_updates / total_updates, 0, 1).

    linear:      k_min + round((k_max - k_min) p)
    cosine:      k_min + round((k_max - k_min) (1 - cos(pi p / 2)))     (reference "cosine_increase")
    exponential: k_min + round((k_max - k_min) (1 - exp(-r p)) / (1 - exp(-r))), r = EXP_RATE
    multistep:   the doubling stages of :func:`multistep_stages`, each 1/len of the schedule
    none:        k_min (the caller uses --moe-top-k instead)
    ``round`` rounds halves up. Every mode gives k_min at p = 0 and k_max at p >= 1, and is
    non-decreasing in p.
    """
    if mode not in SCHEDULES:
        raise ValueError(f"--moe-top-k-schedule: {mode!r} is not allowed; allowed: {', '.join(SCHEDULES)}")
    if mode == "none":
        return k_min
    p = 1.0 if total_updates <= 0 else min(max(num_updates / total_updates, 0.0), 1.0)
    span = k_max - k_min
    if mode == "linear":
        k = k_min + _round_half_up(span * p)
    elif mode == "cosine":
        k = k_min + _round_half_up(span * (1.0 - math.cos(math.pi * p / 2.0)))
    elif mode == "exponential":
        k = k_min + _round_half_up(span * (1.0 - math.exp(-EXP_RATE * p)) / (1.0 - math.exp(-EXP_RATE)))
    else:  # multistep
        stages = multistep_stages(k_min, k_max)
        k = stages[min(int(len(stages) * p), len(stages) - 1)]
    return min(max(k, k_min), k_max)


def validate_top_k_options(cfg, router_name: str) -> None:
    """ValueError naming the option, its value and what is allowed."""
    E = cfg.moe_expert_count
    if cfg.moe_top_k_schedule not in SCHEDULES:
        raise ValueError(
            f"--moe-top-k-schedule: {cfg.moe_top_k_schedule!r} is not allowed for the {router_name} router; "
            f"allowed: {', '.join(SCHEDULES)}"
        )
    if not 0 <= cfg.moe_eval_top_k <= E:
        raise ValueError(
            f"--moe-eval-top-k: {cfg.moe_eval_top_k} is not allowed with --moe-expert-count {E}; "
            f"allowed: 0 (the training K) or 1..{E}"
        )
    if cfg.moe_top_k_schedule == "none":
        return
    if not 1 <= cfg.moe_top_k_min <= E:
        raise ValueError(
            f"--moe-top-k-min: {cfg.moe_top_k_min} is not allowed with --moe-expert-count {E}; allowed: 1..{E}"
        )
    k_max = cfg.moe_top_k_max or E
    if not cfg.moe_top_k_min <= k_max <= E:
        raise ValueError(
            f"--moe-top-k-max: {cfg.moe_top_k_max} is not allowed with --moe-top-k-min {cfg.moe_top_k_min} "
            f"and --moe-expert-count {E}; allowed: 0 (= {E}) or {cfg.moe_top_k_min}..{E}"
        )
    if cfg.moe_top_k_schedule_updates < 1:
        raise ValueError(
            f"--moe-top-k-schedule-updates: {cfg.moe_top_k_schedule_updates} is not allowed with "
            f"--moe-top-k-schedule {cfg.moe_top_k_schedule}; allowed: >= 1 (e.g. --max-update)"
        )


def local_generator(seed: int, layer_index: Optional[int], salt: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, layer, salt) only, never from the global RNG state."""
    g = torch.Generator(device="cpu")
    layer = -1 if layer_index is None else int(layer_index)
    g.manual_seed((int(seed) * 1_000_003 + (layer + 1) * 7919 + int(salt)) % (2**63 - 1))
    return g


def set_eval_top_k(model: nn.Module, k: int) -> int:
    """Set the evaluation K of every top-K-schedule router in ``model`` (0 = training K).

    The in-process twin of ``--model-overrides "{'moe_eval_top_k': k}"``; returns the number
    of routers changed. ValueError if k is outside 0..E of some layer.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, TopKSoftmaxRouter):
            if not 0 <= k <= m.num_experts:
                raise ValueError(f"--moe-eval-top-k: {k} is not allowed; allowed: 0..{m.num_experts}")
            m.eval_top_k = int(k)
            n += 1
    return n


class TopKSoftmaxRouter(Router):
    """Base: subclasses implement :meth:`logits` (``x_TD -> logits_TE``); this class picks
    the top-K logits, softmaxes them, applies the optional capacity and reports stats."""

    #: whether the Switch balance loss is returned (subclasses set it from their options)
    balance_loss: bool = False

    def __init__(self, cfg, model_dim: int, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        self.schedule = cfg.moe_top_k_schedule
        self.k_min = cfg.moe_top_k_min
        self.k_max = cfg.moe_top_k_max or self.num_experts
        self.schedule_updates = cfg.moe_top_k_schedule_updates
        self.eval_top_k = cfg.moe_eval_top_k
        self.top_k = cfg.moe_top_k  # the fixed training K (used without a schedule)
        self.use_fp32 = cfg.moe_gating_use_fp32
        self.capacity_factor = cfg.moe_capacity_factor
        self.eval_capacity_factor = cfg.moe_eval_capacity_factor
        # updates done so far: set by fairseq through set_num_updates, saved in the state_dict
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._num_updates = 0  # python mirror: no device sync per forward

    # --- the K in use -----------------------------------------------------------------
    @property
    def top_k(self) -> int:
        """The K in use now (see the module docstring)."""
        if not self.training and self.eval_top_k > 0:
            return self.eval_top_k
        return self.train_top_k()

    @top_k.setter
    def top_k(self, k: int) -> None:
        # sets the fixed training K (Router.__init__ assigns 1 first; __init__ then --moe-top-k)
        self._fixed_top_k = int(k)

    def train_top_k(self, num_updates: Optional[int] = None) -> int:
        """Training K after ``num_updates`` updates (default: the current count)."""
        if self.schedule == "none":
            return self._fixed_top_k
        n = self._num_updates if num_updates is None else num_updates
        return scheduled_top_k(self.schedule, self.k_min, self.k_max, self.schedule_updates, n)

    def set_num_updates(self, num_updates: int) -> None:
        """Called by fairseq (``BaseFairseqModel.set_num_updates``) with the updates done so far."""
        self._num_updates = int(num_updates)
        self.num_updates.fill_(int(num_updates))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._num_updates = int(self.num_updates)

    # --- routing ----------------------------------------------------------------------
    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """-> logits_TE (fp32 when --moe-gating-use-fp32)."""
        raise NotImplementedError

    def forward(self, x_TD: torch.Tensor, *, tokens: Optional[TokenInfo] = None) -> RouterOutput:
        T = x_TD.shape[0]
        if tokens is not None:
            valid_T = ~tokens.pad_mask_T
            num_valid = valid_T.sum()  # a tensor: the capacity is computed on the device
        else:
            valid_T = torch.ones(T, dtype=torch.bool, device=x_TD.device)
            num_valid = T
        K = self.top_k
        logits_TE = self.logits(x_TD)
        top_TK, expert_ids_TK = logits_TE.topk(K, dim=-1, largest=True, sorted=True)
        weights_TK = torch.softmax(top_TK, dim=-1)
        # padding tokens are not routed: they take no capacity and produce nothing
        expert_ids_TK = expert_ids_TK.masked_fill(~valid_T.unsqueeze(-1), DROPPED)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        cap = None if math.isinf(factor) else capacity(num_valid, self.num_experts, K, factor)
        routed_TK, weights_TK, stats = limit_capacity(expert_ids_TK, weights_TK, self.num_experts, cap)

        probs_TE = torch.softmax(logits_TE, dim=-1)
        aux = {"z": router_z_loss(logits_TE, valid_T)}
        if self.balance_loss:
            aux["balance"] = switch_balance_loss(probs_TE, expert_ids_TK[:, 0].clamp(min=0), valid_T)
        stats["entropy"] = routing_entropy(probs_TE.detach(), valid_T)
        stats["top_k"] = torch.tensor(float(K))
        return RouterOutput(routed_TK, weights_TK.to(x_TD.dtype), aux, stats)
