"""Top-K softmax routing with a scheduled K, shared by HyperRouter, SMoE-Dropout and SMoE.

Shape legend:
  T  tokens in the flattened batch     D  model dimension
  E  experts in the layer              K  experts activated per token (the K in use)

Routing (HyperRouter, Do et al. 2023, arXiv 2312.07035, Sec. 3; SMoE-Dropout, Chen et al.
ICLR 2023; both as in the reference FastMoE gates of giangdip2410/HyperRouter
``custom_gate.py``, ``HyperRouterGate`` / ``CustomNaiveGate``): ``logits_TE = router(x_TD)``;
the K largest logits of each token pick its experts; the combine weights are a softmax over
those K logit values only (not the K largest probabilities of a softmax over all E):
``w_tk = exp(l_tk) / sum_j exp(l_tj)`` for the chosen k. ``y_t = sum_k w_tk f_{e_tk}(x_t)``.

The K in use (``router.top_k``, which ``moe_plugin.utils.param_counts`` reads):
  * evaluation (``model.eval()``): ``--moe-eval-top-k``: -1 (the default) = all E experts,
    N in 1..E = N, 0 = the training K reached (below). fairseq-eval-lm takes it without
    retraining: ``--model-overrides "{'moe_eval_top_k': N}"``. Why E by default: the
    reference's ``train.py`` validates at K = E (``set_router_mode(flag=True)``) and at
    K = ``--moe-top-k``, keeps the best K = E checkpoint (``model_dense.pt``) and reports its
    test perplexity; fairseq's ``checkpoint_best.pt`` (best validation loss) is then that
    checkpoint;
  * training with ``--moe-top-k-schedule`` other than ``none``: the schedule's value at the
    current update count (:func:`scheduled_top_k`, the reference's ``calculate_gate_number``);
  * training without a schedule: ``--moe-top-k``.

The schedule (:func:`scheduled_top_k`) reproduces, for every update count where it is
defined, the reference's ``calculate_gate_number(steps, args, overall_steps, min, max)``
(``new_utils.py``), which ``train.py`` calls before every update with ``steps`` = the
updates done so far and ``overall_steps`` = ``--dynamic_overall_steps``; here ``steps`` is
fairseq's update count and ``overall_steps`` is ``--moe-top-k-schedule-updates`` (default:
fairseq's ``--max-update``, filled in by the arch function from the command line; a hydra
config must set it). Every value is clipped to ``[K_min, K_max]`` and Python's ``round``
(half to even) is used, as in the reference. Where the reference is undefined, the
behaviour is ours, and raises or is said here:
  * ``exp_increase`` with fewer than 300 schedule updates: the reference divides by
    ``overall_steps // 300 = 0``; refused (ValueError at build time);
  * ``multi_step_*`` after the schedule (steps >= overall_steps): the reference indexes past
    its list (IndexError); here K stays at the last stage;
  * ``cosine_*`` after the schedule: the reference's cosine is periodic (it comes back down
    after 3 x overall_steps); here the count is clamped to overall_steps (the same K as the
    reference up to 3 x overall_steps);
  * ``linear_*`` and ``exp_increase`` after the schedule: the reference's formula (clipped),
    which is defined there.

The update count comes from fairseq, which calls ``set_num_updates(n)`` on every submodule
that defines it: before each training forward (``FairseqTask.train_step``, n = updates
done so far) and when loading a checkpoint (trainer and ``load_model_ensemble``). The
router also keeps it in a buffer (``num_updates``, in the ``state_dict``): after training
it holds the count of the last training forward, one less than the checkpoint's
``num_updates`` (fairseq calls ``set_num_updates`` before each forward, not after the last
update). fairseq's loaders (``load_model_ensemble``, the trainer) call
``set_num_updates(checkpoint count)`` *before* ``load_state_dict``, so the buffer wins:
evaluation with ``--moe-eval-top-k 0`` uses the K of the last training forward, and a
resumed fairseq-train sets the right count again before its first forward.

Capacity: the reference FastMoE code never drops tokens, so the archs default to
``--moe-capacity-factor inf --moe-eval-capacity-factor inf`` (no dropping, every token gets
exactly K experts). A finite factor is honoured: capacity ``ceil(factor * K * T / E)``
with GShard's priority (every token's first choice before any second choice);
dropped slots have weight 0 and the residual carries the token.

Aux losses (unweighted; the criterion weights them): ``z`` (router z-loss, weight
``--moe-z-loss-weight``, 0 by default) always; ``balance`` (Switch ``E sum f_e P_e`` over
first choices) only where a subclass enables it (HyperRouter ``--hyper-balance-loss``),
since none of the three methods uses one. Extra stat ``top_k`` (the K in use) is logged per
layer as ``moe_l{i}_top_k``.
"""

from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from moe_plugin.routing._softmax import Selection, SoftmaxRouter

#: the reference's ``--dynamic_moe_mode`` values (``new_utils.py`` ``calculate_gate_number``), and none
SCHEDULES = (
    "none",
    "linear_increase",
    "linear_decrease",
    "cosine_increase",
    "cosine_decrease",
    "exp_increase",
    "multi_step_increase",
    "multi_step_decrease",
)

#: the reference's multi-step K values (hard-coded for 16 experts; clipped to [K_min, K_max])
MULTI_STEP_INCREASE = (1, 2, 4, 8, 16)
#: ``exp_increase``: K_max - (K_max - K_min) * EXP_DECAY ** (steps // (S // EXP_STAGES))
EXP_DECAY = 0.99
EXP_STAGES = 300
#: ``--moe-frozen-router-seed`` value meaning "derive from fairseq's --seed"
SEED_FROM_FAIRSEQ = -1
#: ``--moe-eval-top-k`` value meaning "all experts"
ALL_EXPERTS = -1
#: fairseq's default --seed, used when no seed is known (a router built outside fairseq)
FAIRSEQ_DEFAULT_SEED = 1


@dataclass
class TopKScheduleOptions:
    """Options shared by the ``hyper``, ``smoe_dropout`` and ``smoe`` routers (registered once, by ``hyper``)."""

    moe_top_k_schedule: str = field(
        default="none",
        metadata={
            "help": "hyper/smoe_dropout/smoe: training top-K schedule between --moe-top-k-min and "
            "--moe-top-k-max over --moe-top-k-schedule-updates updates, the reference's --dynamic_moe_mode: "
            "none (K = --moe-top-k) | " + " | ".join(SCHEDULES[1:]) + "; arch default: linear_increase "
            "for hyper_lm and smoe_dropout_lm, none for smoe_lm"
        },
    )
    moe_top_k_min: int = field(
        default=0,
        metadata={"help": "hyper/smoe_dropout/smoe: smallest K of the schedule; 0 = E // 2 (the reference's 8 of 16)"},
    )
    moe_top_k_max: int = field(
        default=0, metadata={"help": "hyper/smoe_dropout/smoe: largest K of the schedule; 0 = E (all experts)"}
    )
    moe_top_k_schedule_updates: int = field(
        default=0,
        metadata={
            "help": "hyper/smoe_dropout/smoe: the schedule's length in updates (the reference's "
            "--dynamic_overall_steps); 0 = fairseq's --max-update (filled in from the command line; a hydra "
            "config must set it)"
        },
    )
    moe_eval_top_k: int = field(
        default=ALL_EXPERTS,
        metadata={
            "help": "hyper/smoe_dropout/smoe: K in evaluation; -1 = all E experts (the reference selects and "
            "tests the best K = E checkpoint), 0 = the training K reached, or 1..E "
            "(fairseq-eval-lm: --model-overrides \"{'moe_eval_top_k': 2}\")"
        },
    )
    moe_frozen_router_seed: int = field(
        default=SEED_FROM_FAIRSEQ,
        metadata={
            "help": "hyper/smoe_dropout: seed of the frozen router parts (hypernetwork, random gate) and the "
            "HyperRouter embedding, combined with the layer index; -1 = fairseq's --seed"
        },
    )


def _round_ratio(num: int, den: int) -> int:
    """``round(num / den)`` with Python's round-half-to-even, in exact integer arithmetic (den > 0)."""
    q, r = divmod(num, den)  # floor division: 0 <= r < den, also for num < 0
    if 2 * r > den or (2 * r == den and q % 2 == 1):
        q += 1
    return q


def top_k_range(k_min: int, k_max: int, num_experts: int) -> Tuple[int, int]:
    """(K_min, K_max) of the schedule with 0 resolved: K_min 0 = max(1, E // 2), K_max 0 = E."""
    return (k_min or max(1, num_experts // 2)), (k_max or num_experts)


def scheduled_top_k(mode: str, k_min: int, k_max: int, total_updates: int, num_updates: int) -> int:
    """K after ``num_updates`` updates of a schedule of ``total_updates`` (S) updates.

    The reference's rule (giangdip2410/HyperRouter ``new_utils.py`` ``calculate_gate_number``),
    n = num_updates, ``round`` = Python's round half to even, then clipped to [k_min, k_max]:

    linear_increase:     k_min + round((k_max - k_min) n / S)
    linear_decrease:     k_max + round((k_min - k_max) n / S)
    cosine_increase:     k_max + round((k_min - k_max) cos(pi n / (2 S)))
    cosine_decrease:     k_min + round((k_max - k_min) cos(pi n / (2 S)))
    exp_increase:        k_max + round((k_min - k_max) 0.99 ** (n // (S // 300)))   (S >= 300)
    multi_step_increase: (1, 2, 4, 8, 16)[5 n // S]
    multi_step_decrease: (16, 8, 4, 2, 1)[5 n // S]
    none:                k_min (the caller uses --moe-top-k instead)

    After the schedule (n > S): see the module docstring (cosine: n clamped to S;
    multi-step: the last stage; linear and exp: the formula). The linear and multi-step
    divisions are exact integer arithmetic; cosine and exp are the reference's float64
    operations (numpy's cos, Python's float power).
    """
    if mode not in SCHEDULES:
        raise ValueError(f"--moe-top-k-schedule: {mode!r} is not allowed; allowed: {', '.join(SCHEDULES)}")
    if mode == "none":
        return k_min
    S, n = int(total_updates), max(int(num_updates), 0)
    if S < 1:
        raise ValueError(f"--moe-top-k-schedule-updates: {S} is not allowed with --moe-top-k-schedule {mode}; "
                         "allowed: >= 1")
    if mode == "linear_increase":
        k = k_min + _round_ratio((k_max - k_min) * n, S)
    elif mode == "linear_decrease":
        k = k_max + _round_ratio((k_min - k_max) * n, S)
    elif mode in ("cosine_increase", "cosine_decrease"):
        cos = float(np.cos(np.pi * min(n, S) / (2 * S)))
        if mode == "cosine_increase":
            k = k_max + round((k_min - k_max) * cos)
        else:
            k = k_min + round((k_max - k_min) * cos)
    elif mode == "exp_increase":
        if S < EXP_STAGES:
            raise ValueError(
                f"--moe-top-k-schedule-updates: {S} is not allowed with --moe-top-k-schedule exp_increase; allowed: "
                f">= {EXP_STAGES} (the reference decays K once every S // {EXP_STAGES} updates)"
            )
        k = k_max + round((k_min - k_max) * EXP_DECAY ** (n // (S // EXP_STAGES)))
    else:
        stages = MULTI_STEP_INCREASE if mode == "multi_step_increase" else MULTI_STEP_INCREASE[::-1]
        k = stages[min(len(stages) * n // S, len(stages) - 1)]
    return min(max(k, k_min), k_max)


def validate_top_k_options(cfg, router_name: str) -> None:
    """ValueError naming the option, its value and what is allowed."""
    E = cfg.moe_expert_count
    if cfg.moe_top_k_schedule not in SCHEDULES:
        raise ValueError(
            f"--moe-top-k-schedule: {cfg.moe_top_k_schedule!r} is not allowed for the {router_name} router; "
            f"allowed: {', '.join(SCHEDULES)}"
        )
    if not (cfg.moe_eval_top_k == ALL_EXPERTS or 0 <= cfg.moe_eval_top_k <= E):
        raise ValueError(
            f"--moe-eval-top-k: {cfg.moe_eval_top_k} is not allowed with --moe-expert-count {E}; "
            f"allowed: -1 (all {E} experts), 0 (the training K) or 1..{E}"
        )
    seed = getattr(cfg, "moe_frozen_router_seed", SEED_FROM_FAIRSEQ)
    if seed is not None and seed < SEED_FROM_FAIRSEQ:
        raise ValueError(
            f"--moe-frozen-router-seed: {seed} is not allowed; allowed: -1 (fairseq's --seed) or a seed >= 0"
        )
    if cfg.moe_top_k_schedule == "none":
        return
    if not 0 <= cfg.moe_top_k_min <= E:
        raise ValueError(
            f"--moe-top-k-min: {cfg.moe_top_k_min} is not allowed with --moe-expert-count {E}; "
            f"allowed: 0 (= {max(1, E // 2)}) or 1..{E}"
        )
    k_min, k_max = top_k_range(cfg.moe_top_k_min, cfg.moe_top_k_max, E)
    if not (cfg.moe_top_k_max == 0 or k_min <= cfg.moe_top_k_max <= E) or k_max < k_min:
        raise ValueError(
            f"--moe-top-k-max: {cfg.moe_top_k_max} is not allowed with --moe-top-k-min {cfg.moe_top_k_min} "
            f"(= {k_min}) and --moe-expert-count {E}; allowed: 0 (= {E}) or {k_min}..{E}"
        )
    S = cfg.moe_top_k_schedule_updates
    if S < 1:
        raise ValueError(
            f"--moe-top-k-schedule-updates: {S} is not allowed with --moe-top-k-schedule {cfg.moe_top_k_schedule}; "
            "allowed: >= 1. Its default is fairseq's --max-update, taken from the command line: give --max-update "
            "(> 0) or --moe-top-k-schedule-updates (a hydra config: model.moe_top_k_schedule_updates)"
        )
    if cfg.moe_top_k_schedule == "exp_increase":
        scheduled_top_k("exp_increase", k_min, k_max, S, 0)  # raises below 300 updates


def frozen_router_seed(cfg) -> int:
    """The seed of a router's frozen parts: ``--moe-frozen-router-seed`` if set (>= 0), else
    fairseq's ``--seed`` (``cfg.moe_seed``), else 1 (fairseq's default --seed; a router built
    outside fairseq)."""
    seed = getattr(cfg, "moe_frozen_router_seed", SEED_FROM_FAIRSEQ)
    if seed is not None and seed >= 0:
        return int(seed)
    fairseq_seed = getattr(cfg, "moe_seed", None)
    return FAIRSEQ_DEFAULT_SEED if fairseq_seed is None else int(fairseq_seed)


def local_generator(seed: int, layer_index: Optional[int], salt: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, layer, salt) only, never from the global RNG state."""
    g = torch.Generator(device="cpu")
    layer = -1 if layer_index is None else int(layer_index)
    g.manual_seed((int(seed) * 1_000_003 + (layer + 1) * 7919 + int(salt)) % (2**63 - 1))
    return g


def set_eval_top_k(model: nn.Module, k: int) -> int:
    """Set the evaluation K of every top-K-schedule router in ``model`` (-1 = all experts,
    0 = training K).

    The in-process twin of ``--model-overrides "{'moe_eval_top_k': k}"``; returns the number
    of routers changed. ValueError if k is outside -1..E of some layer.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, TopKSoftmaxRouter):
            if not (k == ALL_EXPERTS or 0 <= k <= m.num_experts):
                raise ValueError(f"--moe-eval-top-k: {k} is not allowed; allowed: -1 (all), 0 or 1..{m.num_experts}")
            m.eval_top_k = int(k)
            n += 1
    return n


class TopKSoftmaxRouter(SoftmaxRouter):
    """Top-K over the logits with a scheduled K, on the softmax skeleton
    (``moe_plugin/routing/_softmax.py``): subclasses make the logits (a ``self.gate``
    ``nn.Linear`` by default); this class picks the K in use and the top-K logits, and
    softmaxes those K values."""

    #: whether the Switch balance loss is returned (subclasses set it from their options)
    balance_loss: bool = False
    #: the ``--moe-top-k-schedule`` an arch of this router defaults to (see :meth:`complete_arch_args`)
    arch_schedule: str = "none"

    @classmethod
    def complete_arch_args(cls, args) -> None:
        """Defaults that need the whole command line, set by the arch function
        (``moe_plugin/models/moe_lm.py``) before the core defaults: the schedule
        (:attr:`arch_schedule`) unless the user chose one, and, with a schedule, its length =
        fairseq's ``--max-update`` unless given. fairseq-train's Namespace has ``max_update``;
        a hydra model config does not (it keeps 0, and validation asks for the option)."""
        if getattr(args, "moe_top_k_schedule", None) is None:
            args.moe_top_k_schedule = cls.arch_schedule
        if args.moe_top_k_schedule != "none" and not getattr(args, "moe_top_k_schedule_updates", None):
            args.moe_top_k_schedule_updates = int(getattr(args, "max_update", None) or 0)

    def __init__(self, cfg, model_dim: int, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        self.schedule = cfg.moe_top_k_schedule
        self.k_min, self.k_max = top_k_range(cfg.moe_top_k_min, cfg.moe_top_k_max, self.num_experts)
        self.schedule_updates = cfg.moe_top_k_schedule_updates
        self.eval_top_k = cfg.moe_eval_top_k
        self.top_k = cfg.moe_top_k  # the fixed training K (used without a schedule)
        # updates done so far: set by fairseq through set_num_updates, saved in the state_dict
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._num_updates = 0  # python mirror: no device sync per forward

    # --- the K in use -----------------------------------------------------------------
    @property
    def top_k(self) -> int:
        """The K in use now (see the module docstring)."""
        if not self.training and self.eval_top_k != 0:
            return self.num_experts if self.eval_top_k == ALL_EXPERTS else self.eval_top_k
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
        super().set_num_updates(num_updates)
        self._num_updates = int(num_updates)
        self.num_updates.fill_(int(num_updates))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._num_updates = int(self.num_updates)

    # --- the skeleton's hooks ----------------------------------------------------------
    def select(self, probs_TE: torch.Tensor, logits_TE: torch.Tensor, top_k: int) -> Selection:
        """The K largest logits; combine weights = softmax over those K values only."""
        top_TK, expert_ids_TK = logits_TE.topk(top_k, dim=-1, largest=True, sorted=True)
        return Selection(expert_ids_TK, torch.softmax(top_TK, dim=-1))

    def extra_stats(self, probs_TE, chosen_TK, routed_TK, valid_T, sel, aux):
        return {"top_k": torch.tensor(float(chosen_TK.shape[1]))}
