"""Sinkhorn routing, S-BASE (Clark, de las Casas, Guy, Mensch et al., "Unified Scaling Laws
for Routed Language Models", ICML 2022, arXiv 2202.01169), as Megatron-Core computes it
(NVIDIA/Megatron-LM ``megatron/core/transformer/moe/moe_utils.py`` ``sinkhorn`` and
``megatron/core/transformer/moe/router.py`` ``TopKRouter.sinkhorn_load_balancing``, the
load-balancing type ``sinkhorn``).

Legend: T tokens (padding included), N non-padding tokens, D model dim, E experts, K = 1.

S-BASE is BASE (Lewis et al. 2021, ``balanced.py``) with the exact balanced assignment
replaced by an approximate one: a few Sinkhorn iterations normalise the matrix of router
scores towards uniform marginals, and every token takes the expert where the normalised
matrix is largest. No auxiliary loss (Megatron refuses one with ``sinkhorn``).

What this router computes for the N non-padding tokens of a batch:

1. logits ``l_te = x_t . w_e`` of a learned ``Linear(D, E)`` without bias
   (``LinearGateRouter`` of ``_softmax.py``: ``--moe-router-init``, fp32 under
   ``--moe-gating-use-fp32``, optional ``--moe-jitter-eps``);
2. **training** (``self.training``): on the detached logits in fp32 (at least),
   ``K_te = exp(l_te / tau)`` (``tau = --sinkhorn-temperature``, Megatron: 1) and
   Sinkhorn's alternating scaling with targets ``r_t = 1/N`` (rows) and ``c_e = 1/E``
   (columns), started from ``d1 = 1``::

       d0_t = r_t / (sum_e K_te d1_e + eps)        d1_e = c_e / (sum_t d0_t K_te + eps)

   ``eps = 1e-8`` (Megatron's). One iteration is the pair of updates; after iteration i
   the change ``delta_i = mean_e |d1_e - d1_e^{(i-1)}|`` is Megatron's stopping quantity:
   stop once ``delta <= --sinkhorn-tol`` (Megatron: 1e-4) or after
   ``--sinkhorn-iterations`` iterations (Megatron has no cap; ``--sinkhorn-tol 0`` runs
   exactly that many, with no read-back from the device). The plan
   ``P_te = d0_t K_te d1_e`` has column sums exactly ``1/E`` (times ``s/(s + eps)``) and
   row sums ``1/N`` up to the stopping error; the expert of token t is
   ``argmax_e P_te`` (ties: lowest index);
3. **evaluation**: ``argmax_e l_te``, greedy top-1 of the raw logits (a token's expert
   must not depend on the other tokens of the batch, future ones included); incremental
   decoding is evaluation;
4. combine weight (``--sinkhorn-gate``): ``sigmoid(l_te)`` of the chosen expert (default:
   Megatron's activation for top-1, and BASE's gate ``sigmoid(h . w_e)``), or
   ``softmax(l_t)_e`` (Switch's gate); it carries the gradient to the router (the
   Sinkhorn step has none, as in Megatron);
5. capacity as the other routers (``limit_capacity``): ``ceil(factor * N / E)`` per expert,
   ``--moe-capacity-factor`` (``sbase_lm``'s default 2.0, see below) in training,
   ``--moe-eval-capacity-factor`` (default inf) in evaluation; tokens over it are dropped
   in token order and pass through the residual;
6. aux losses: only the router z-loss ``z`` (weight ``--moe-z-loss-weight``, default 0), so
   by default nothing is added to the loss; stats ``tokens_per_expert``, ``dropped_frac``,
   ``entropy`` (of ``softmax(l)``), ``sinkhorn_iterations`` (0 in evaluation) and
   ``sinkhorn_delta`` (the last ``delta``; 0 in evaluation).

Padding tokens are not routed (id ``DROPPED``, weight 0) and are not in the Sinkhorn
problem: their rows of K are zero and the row target is 1/N over the real tokens, exactly
the problem on the N real rows (no token index is gathered, so nothing is read back).

Numerics (a reparametrisation, not a change): the logits of each row are shifted by the
row's maximum before ``exp``. Row scaling of K is absorbed by ``d0`` (``d0`` is recomputed
from ``d1`` first in every iteration), so ``d1``, ``delta``, the plan and the assignment are
those of Megatron's unshifted ``exp(l)`` (up to where ``eps`` is added); Megatron's version
overflows to inf/NaN for logits above ~88, this one does not.

Why ``argmax P`` is near-optimal: ``argmax_e P_te = argmax_e (l_te / tau + log d1_e)``, a
greedy assignment under the expert prices ``-tau log d1_e``; by linear-programming duality
it is the exact optimum of the assignment problem whose loads are the loads it produces.
What Sinkhorn gives up against BASE's exact balanced assignment is balance, not optimality
for its own loads: the loads of the rounded plan are only near ``N/E`` (the smaller tau,
the nearer and the more iterations; ``tests/test_sinkhorn_router.py``,
``scripts/bench_assignment.py``, docs/sinkhorn.md).

``sbase_lm``'s capacity factor 2.0: S-BASE has no capacity of its own (BASE drops nothing,
Megatron's default is dropless); the factor is a bound on an expert's load (memory) in case
the rounded plan is far from balanced (an iteration cap reached, a small batch), not a
target: on a converged plan the loads stay far below it and nothing is dropped.
``--moe-capacity-factor inf`` is Megatron's dropless run.

Clark et al.'s own description of S-BASE could not be read here beyond its name and role
(a Sinkhorn approximation of BASE's balanced assignment); the iteration, the stopping rule,
the gate and the greedy evaluation follow Megatron-Core, which implements the same
load-balancing type. K > 1 (Megatron: top-K of the plan with softmax weights) is not offered.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from moe_plugin.routing._softmax import LinearGateRouter, Selection
from moe_plugin.routing.interface import register_router

#: --sinkhorn-gate values
SINKHORN_GATES = ("sigmoid", "softmax")
#: Megatron-Core's constant in the denominators of the scaling updates
SINKHORN_EPS = 1e-8


@dataclasses.dataclass
class SinkhornResult:
    """plan_TE: the normalised matrix ``d0_t K_te d1_e`` (padding rows 0); expert_T: its
    row-wise argmax; iterations: scaling iterations run; delta: 0-dim tensor, the last
    ``mean_e |d1_e - d1_e_previous|``; log_d1_E: ``log d1`` (the expert prices are ``-tau log d1``)."""

    plan_TE: torch.Tensor
    expert_T: torch.Tensor
    iterations: int
    delta: torch.Tensor
    log_d1_E: torch.Tensor


def sinkhorn(
    scores_TE: torch.Tensor,
    valid_T: Optional[torch.Tensor] = None,
    *,
    tol: float = 1e-4,
    max_iterations: int = 100,
    temperature: float = 1.0,
) -> SinkhornResult:
    """Sinkhorn normalisation of ``exp(scores / temperature)`` towards rows ``1/N`` (the N
    rows where ``valid_T``; other rows are left out) and columns ``1/E`` (module docstring,
    step 2). No gradient; computed in float32 (float64 input stays float64).

    tol > 0: stop once the change of ``d1`` is ``<= tol`` (one read-back per iteration), at
    most ``max_iterations``; tol = 0: exactly ``max_iterations`` iterations, no read-back.
    """
    if scores_TE.dim() != 2:
        raise ValueError(f"sinkhorn: scores must be (T, E), got shape {tuple(scores_TE.shape)}")
    if max_iterations < 1:
        raise ValueError(f"sinkhorn: max_iterations {max_iterations} must be >= 1")
    if not (tol >= 0) or math.isinf(tol):
        raise ValueError(f"sinkhorn: tol {tol} must be a finite number >= 0")
    if not (temperature > 0) or math.isinf(temperature):
        raise ValueError(f"sinkhorn: temperature {temperature} must be a finite number > 0")
    T, E = scores_TE.shape
    dtype = torch.promote_types(scores_TE.dtype, torch.float32)
    with torch.no_grad():
        s_TE = scores_TE.detach().to(dtype) / temperature
        if valid_T is None:
            valid_T = torch.ones(T, dtype=torch.bool, device=s_TE.device)
        w_T = valid_T.to(dtype)
        # row-max shift (absorbed by d0: module docstring, "Numerics"); padding rows are 0
        s_TE = torch.where(valid_T.unsqueeze(1), s_TE, torch.zeros_like(s_TE))
        K_TE = torch.exp(s_TE - s_TE.amax(dim=1, keepdim=True)) * w_T.unsqueeze(1)
        r_T = w_T / w_T.sum().clamp(min=1.0)  # 1/N on the real rows, 0 on padding
        c = 1.0 / E
        d1_E = torch.ones(E, dtype=dtype, device=s_TE.device)
        delta = torch.full((), float("inf"), dtype=dtype, device=s_TE.device)
        iterations = 0
        while iterations < max_iterations:
            d0_T = r_T / (K_TE @ d1_E + SINKHORN_EPS)
            d1_new_E = c / (d0_T @ K_TE + SINKHORN_EPS)
            delta = (d1_new_E - d1_E).abs().mean()
            d1_E = d1_new_E
            iterations += 1
            if tol > 0 and float(delta) <= tol:
                break
        plan_TE = d0_T.unsqueeze(1) * K_TE * d1_E.unsqueeze(0)
        expert_T = plan_TE.argmax(dim=1)
    return SinkhornResult(plan_TE, expert_T, iterations, delta, torch.log(d1_E))


@dataclass
class SinkhornOptions:
    sinkhorn_iterations: int = field(
        default=100,
        metadata={"help": "sbase_lm: at most this many Sinkhorn iterations per batch in training (with "
                          "--sinkhorn-tol 0: exactly this many); Megatron-Core iterates without a cap"},
    )
    sinkhorn_tol: float = field(
        default=1e-4,
        metadata={"help": "sbase_lm: stop the Sinkhorn iterations once mean |change of the column scaling| "
                          "<= tol (Megatron-Core's rule and value); 0 = always run --sinkhorn-iterations "
                          "(no read-back from the device)"},
    )
    sinkhorn_temperature: float = field(
        default=1.0,
        metadata={"help": "sbase_lm: Sinkhorn on exp(logits / temperature) (Megatron-Core: 1); smaller = "
                          "closer to the exact balanced assignment, more iterations"},
    )
    sinkhorn_gate: str = field(
        default="sigmoid",
        metadata={"help": "sbase_lm: combine weight of the chosen expert: 'sigmoid' (sigmoid(logit), "
                          "Megatron-Core's top-1 activation, BASE's gate) or 'softmax' (softmax probability, "
                          "Switch's gate)"},
    )


@register_router(
    "sinkhorn",
    options=SinkhornOptions,
    arch="sbase_lm",
    # top-1; capacity 2.0: a bound on an expert's load, not a target (module docstring)
    arch_defaults={"moe_top_k": 1, "moe_capacity_factor": 2.0},
)
class SinkhornRouter(LinearGateRouter):
    """S-BASE: Sinkhorn-balanced top-1 in training, greedy top-1 in evaluation (module docstring)."""

    balance_loss = False

    def __init__(self, cfg, model_dim: int, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        self.max_iterations = int(cfg.sinkhorn_iterations)
        self.tol = float(cfg.sinkhorn_tol)
        self.temperature = float(cfg.sinkhorn_temperature)
        self.gate_kind = cfg.sinkhorn_gate

    @staticmethod
    def validate(cfg) -> None:
        if cfg.moe_top_k != 1:
            raise ValueError(f"--moe-top-k: {cfg.moe_top_k} is not allowed for the sinkhorn router; allowed: 1")
        it = cfg.sinkhorn_iterations
        if isinstance(it, bool) or not isinstance(it, int) or it < 1:
            raise ValueError(f"--sinkhorn-iterations: {it!r} is not allowed; allowed: an integer >= 1")
        tol = cfg.sinkhorn_tol
        if not (tol >= 0) or math.isinf(tol):
            raise ValueError(f"--sinkhorn-tol: {tol} is not allowed; allowed: a finite number >= 0 (0 = no early stop)")
        tau = cfg.sinkhorn_temperature
        if not (tau > 0) or math.isinf(tau):
            raise ValueError(f"--sinkhorn-temperature: {tau} is not allowed; allowed: a finite number > 0")
        if cfg.sinkhorn_gate not in SINKHORN_GATES:
            raise ValueError(
                f"--sinkhorn-gate: {cfg.sinkhorn_gate!r} is not allowed; allowed: {', '.join(SINKHORN_GATES)}"
            )
        eps = getattr(cfg, "moe_jitter_eps", 0.0)
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"--moe-jitter-eps: {eps} is not allowed; allowed: 0 <= eps < 1")

    # the softmax skeleton's forward (padding, capacity, z-loss, stats); Sinkhorn's
    # marginals leave padding out, so the selection reads the forward's valid mask
    def select(self, probs_TE, logits_TE, top_k):
        tokens, valid_T = self.forward_tokens, self.forward_valid_T
        if valid_T is None:
            valid_T = torch.ones(logits_TE.shape[0], dtype=torch.bool, device=logits_TE.device)
        incremental = tokens is not None and tokens.incremental
        extras = {}
        if self.training and not incremental:
            res = sinkhorn(logits_TE, valid_T, tol=self.tol, max_iterations=self.max_iterations,
                           temperature=self.temperature)
            expert_T = res.expert_T
            extras["sinkhorn_iterations"] = torch.tensor(float(res.iterations), device=logits_TE.device)
            extras["sinkhorn_delta"] = res.delta.detach().float()
        else:
            expert_T = logits_TE.detach().argmax(dim=-1)
            extras["sinkhorn_iterations"] = torch.zeros((), device=logits_TE.device)
            extras["sinkhorn_delta"] = torch.zeros((), device=logits_TE.device)
        gate_TE = torch.sigmoid(logits_TE) if self.gate_kind == "sigmoid" else probs_TE
        expert_T1 = expert_T.unsqueeze(1)
        return Selection(expert_T1, gate_TE.gather(1, expert_T1), extras=extras)

    def extra_stats(self, probs_TE, chosen_TK, routed_TK, valid_T, sel, aux):
        return {k: v.to(probs_TE.device) for k, v in sel.extras.items()}
