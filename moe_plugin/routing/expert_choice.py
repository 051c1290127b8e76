"""Expert-choice routing (Zhou, Lei, Liu, Du, Huang, Zhao, Dai, Chen, Le, Laudon, NeurIPS 2022,
"Mixture-of-Experts with Expert Choice Routing", arXiv 2202.09368).

Legend: T tokens of the batch (padding included), D model dim, E experts, C tokens per expert.

Tokens do not choose experts: every expert chooses its C best tokens of the batch (Sec. 3.1).

* Scores ``S = softmax(x W_g)`` (T, E) over the experts, ``W_g`` a bias-free ``Linear(D, E)``
  (``LinearGateRouter`` of ``_softmax.py``: ``--moe-router-init``, ``--moe-jitter-eps``, fp32
  under ``--moe-gating-use-fp32``, the softmax skeleton's conventions).
* Capacity ``C = ceil(c * T_valid / E)`` (at least 1), the paper's ``k = n * c / e`` with
  capacity factor c = ``--moe-capacity-factor`` in training and ``--moe-eval-capacity-factor`` in
  evaluation; ``T_valid`` counts the non-padding tokens (the paper's n counts every token of
  the batch; padding is not routed here). c is the mean number of experts per token: the
  arch default is the paper's main setting c = 2 (EC-CF2, compute of top-2 gating); c = 1 is
  EC-CF1 (compute of Switch top-1). The evaluation factor defaults to the training factor
  (the paper evaluates with the same rule); ``inf`` makes every expert take every token.
* Expert e takes the C non-padding tokens with the largest ``S[:, e]`` (``G, I = TopK(S^T, C)``);
  when ``C >= T_valid`` it takes all of them, so every expert gets exactly ``min(C, T_valid)``
  tokens. Ties are broken by the row index: the earlier row (fairseq's T x B order: earlier
  position, then lower sequence index in the batch) first. Padding is never chosen.
* Combine weight of a chosen pair (t, e) = ``S[t, e]`` (the paper's gating matrix G; no
  renormalisation). A token may be chosen by several experts, by one, or by none: a token no
  expert chose gets no expert output and passes through the residual.
* Output layout: ``expert_ids_TK`` is (T, E), column e = e where expert e chose the token and
  ``DROPPED`` elsewhere (K = E, the most experts one token can get; the paper's capped variant,
  which bounds the experts per token, is not implemented: the paper found it worse).
* Aux losses: none for balance (the method balances by construction); the router z-loss ``z``
  (weight ``--moe-z-loss-weight``, 0 by default) as every softmax router.
* Stats: ``tokens_per_expert`` (= min(C, T_valid) for every expert), ``dropped_frac`` = the
  share of non-padding tokens that no expert chose (not a share of slots), ``entropy``,
  ``experts_per_token`` (mean over non-padding tokens) and ``capacity`` (C).

Causality. Expert e's choice of token t depends on the scores of every token of the batch,
those after t in its own sequence included, so in a causal LM the output at t depends on the
future (and on the other sequences of the batch). Training learns to use that. fairseq-train's
own validation routes the same way (a training diagnostic, as for the oracle hash: its valid
loss is not a causal LM's). Inference is refused: fairseq-eval-lm, fairseq-generate and the
hub interface call ``model.prepare_for_inference_``, whose ``make_generation_fast_`` reaches
this router and raises. ``--expert-choice-allow-future-leak``
(fairseq-eval-lm: ``--model-overrides "{'expert_choice_allow_future_leak': True}"``) allows
it, knowingly. Generation (incremental decoding) is refused even then (:meth:`causal_refusal`):
a step routes among the current tokens of the batch only, not what the full forward computes.
An evaluation factor of ``inf`` leaks nothing (every expert takes every token, each token's
output depends on itself only) and is allowed without the option.

Expert parallelism: routing runs on each rank over that rank's tokens, so C is per rank's
batch (as in every implementation: the paper routes per group of tokens).

Public code read: flaxformer's ``ExpertsChooseMaskedRouter`` (as copied into
huggingface/transformers ``models/switchtransformers/router_flax.py``), which masks padding to
probability 0 but may still choose it, and counts every token in C; docs/expert_choice.md
lists where this file differs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from moe_plugin.losses import router_z_loss, routing_entropy
from moe_plugin.routing._softmax import LinearGateRouter
from moe_plugin.routing.interface import DROPPED, RouterOutput, TokenInfo, capacity, register_router

logger = logging.getLogger(__name__)


@dataclass
class ExpertChoiceOptions:
    expert_choice_allow_future_leak: bool = field(
        default=False,
        metadata={"help": "expert_choice: allow full-forward inference (fairseq-eval-lm, the hub's score) "
                          "although each expert's choice of tokens looks at the whole batch, future tokens "
                          "included (fairseq-eval-lm: --model-overrides \"{'expert_choice_allow_future_leak': "
                          "True}\"); default: refused; generation (incremental decoding) is refused even with it "
                          "(see docs/expert_choice.md)"},
    )


def expert_capacity(num_valid, num_experts: int, factor: float):
    """Tokens per expert ``C = ceil(factor * num_valid / E)``, at least 1; ``factor = inf``:
    ``num_valid`` (every token). ``num_valid`` may be a 0-dim tensor (no host sync)."""
    return capacity(num_valid, num_experts, 1, factor)


def expert_choice_mask(scores_TE: torch.Tensor, valid_T: torch.Tensor, cap) -> torch.Tensor:
    """(T, E) bool: expert e chose token t. Each expert takes its ``cap`` non-padding tokens of
    largest score (all of them when ``cap >= T_valid``); equal scores: the lower row first.

    A stable descending sort of every column gives each token its rank within each expert's
    column (padding set to -inf sorts last and is masked out), so ``cap`` may be a 0-dim
    tensor and nothing is read back from the device.
    """
    T, E = scores_TE.shape
    masked_TE = scores_TE.detach().masked_fill(~valid_T.unsqueeze(1), float("-inf"))
    order_TE = torch.sort(masked_TE, dim=0, descending=True, stable=True).indices  # row r: rank-r token
    rank_TE = torch.empty_like(order_TE)
    rank_TE.scatter_(0, order_TE, torch.arange(T, device=scores_TE.device).unsqueeze(1).expand(T, E))
    return (rank_TE < cap) & valid_T.unsqueeze(1)


def _training_capacity_factor(args) -> float:
    """expert_choice_lm's default ``--moe-eval-capacity-factor``: the training factor."""
    return args.moe_capacity_factor


@register_router(
    "expert_choice",
    options=ExpertChoiceOptions,
    arch="expert_choice_lm",
    # the evaluation factor follows the training factor unless given (a callable is computed
    # from the options given, after the plain default above it: moe_plugin/models/archs.py)
    arch_defaults={
        "moe_top_k": 1,
        "moe_capacity_factor": 2.0,
        "moe_eval_capacity_factor": _training_capacity_factor,
    },
)
class ExpertChoiceRouter(LinearGateRouter):
    """Each expert takes its top-C tokens (module docstring). ``top_k`` is the mean number of
    experts per token the capacity gives, ``min(c, E)`` (a float; what FLOP and active-parameter
    counts read), not a per-token slot count."""

    evaluation_sees_future = True

    balance_loss = False

    def __init__(self, cfg, model_dim: int, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        self.allow_future_leak = bool(getattr(cfg, "expert_choice_allow_future_leak", False))
        # set by make_generation_fast_ (fairseq's "this model is for inference only" hook)
        self.inference_only = False

    @property
    def top_k(self) -> float:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return float(min(factor, self.num_experts))

    @top_k.setter
    def top_k(self, value) -> None:
        pass  # Router.__init__ assigns 1; the experts per token follow the capacity factor

    @staticmethod
    def validate(cfg) -> None:
        if cfg.moe_top_k != 1:
            raise ValueError(
                f"--moe-top-k: {cfg.moe_top_k} is not allowed for the expert_choice router (experts choose "
                "tokens; the mean number of experts per token is --moe-capacity-factor); allowed: 1"
            )
        if not 0.0 <= cfg.moe_jitter_eps < 1.0:
            raise ValueError(f"--moe-jitter-eps: {cfg.moe_jitter_eps} is not allowed; allowed: 0 <= eps < 1")
        allow = getattr(cfg, "expert_choice_allow_future_leak", False)
        if not isinstance(allow, bool):
            raise ValueError(
                f"--expert-choice-allow-future-leak: {allow!r} is not allowed; allowed: True or False"
            )

    # -- causality ------------------------------------------------------------------------
    def leaks_in_eval(self) -> bool:
        """Whether evaluation routing depends on other tokens of the batch (a finite factor)."""
        return not math.isinf(self.eval_capacity_factor)

    def _refusal(self, where: str) -> str:
        return (
            f"expert_choice: refused: {where}. Each expert takes its top-C tokens of the whole batch "
            f"(--moe-eval-capacity-factor {self.eval_capacity_factor}), so whether token t gets an expert "
            "depends on the tokens after t in its sequence (and on the other sequences of the batch): a causal "
            "LM evaluated or decoded this way sees the future. Allowed: pass --expert-choice-allow-future-leak "
            "(fairseq-eval-lm: --model-overrides \"{'expert_choice_allow_future_leak': True}\") to evaluate "
            "anyway, knowing the scores are not a causal LM's; or --moe-eval-capacity-factor inf (every "
            "expert takes every token: no leak, but not the routing the model was trained with)"
        )

    def make_generation_fast_(self, **kwargs) -> None:
        """fairseq calls this (through ``prepare_for_inference_``) in eval-lm and generation."""
        self.inference_only = True
        if not self.leaks_in_eval():
            return
        where = "this model is being prepared for inference (fairseq-eval-lm / fairseq-generate / hub interface)"
        if not self.allow_future_leak:
            raise ValueError(self._refusal(where))
        logger.warning("expert_choice (%s): --expert-choice-allow-future-leak: inference routes over the whole "
                       "batch, future tokens included; the scores are not a causal LM's", kwargs.get("name", "?"))

    def causal_refusal(self) -> Optional[str]:
        if not self.leaks_in_eval():
            return None
        return self._refusal("generation (incremental decoding: each step would route among the current tokens "
                             "of the batch only), even with --expert-choice-allow-future-leak")

    # -- the forward ----------------------------------------------------------------------
    def forward(self, x_TD: torch.Tensor, *, tokens: Optional[TokenInfo] = None) -> RouterOutput:
        T, E = x_TD.shape[0], self.num_experts
        leaks = self.training or self.leaks_in_eval()
        if leaks and not self.allow_future_leak:
            if self.inference_only:
                raise ValueError(self._refusal("the model was prepared for inference"))
        if tokens is not None:
            valid_T = ~tokens.pad_mask_T
            num_valid = valid_T.sum()  # a tensor: C is computed on the device
        else:
            valid_T = torch.ones(T, dtype=torch.bool, device=x_TD.device)
            num_valid = T
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        cap = expert_capacity(num_valid, E, factor)
        chosen_TE = expert_choice_mask(probs_TE, valid_T, cap)
        experts_TE = torch.arange(E, device=x_TD.device).unsqueeze(0).expand(T, E)
        expert_ids_TE = torch.where(chosen_TE, experts_TE, torch.full_like(experts_TE, DROPPED))
        weights_TE = probs_TE * chosen_TE.to(probs_TE.dtype)  # the paper's G: S[t, e] where chosen

        aux = {"z": router_z_loss(logits_TE, valid_T)}
        with torch.no_grad():
            n_valid = valid_T.sum().clamp(min=1).double()
            experts_per_token_T = chosen_TE.sum(1)
            stats = {
                "tokens_per_expert": chosen_TE.sum(0).long(),
                "dropped_frac": ((valid_T & (experts_per_token_T == 0)).sum().double() / n_valid).detach(),
                "entropy": routing_entropy(probs_TE.detach(), valid_T),
                "experts_per_token": (experts_per_token_T.double() * valid_T).sum() / n_valid,
                "capacity": torch.as_tensor(cap, device=x_TD.device).double().reshape(()),
            }
        return RouterOutput(expert_ids_TE, weights_TE.to(x_TD.dtype), aux, stats)
