"""GShard top-2 routing (Lepikhin et al. 2021), as fairseq's moe branch computes it
(``fairseq/modules/moe/top2gate.py`` ``top2gating``).

Legend: T tokens, D model dim, E experts; slot 1/2 = first/second expert of a token.

First expert = argmax of the softmax gate g; second = argmax over the others (policy
below). Second-expert policy (``--moe-second-expert-policy``):
  all      - always dispatch to the second expert;
  sampling - the second expert is argmax(logits + Gumbel noise) over the experts other than
             the first (a sample from the gate distribution without the first), in training;
  random   - keep the second expert when 2 * g2 > u, u ~ U(0, 1) (GShard's "random
             routing"), in training; g2 is the second gate value at that point of the
             computation: normalised when normalising before dropping, raw otherwise
             (as top2gating).
Evaluation always uses ``all`` so that evaluation is deterministic (top2gating applies the
policy in evaluation too). Capacity is ``ceil(factor * 2 * T / E)``: factor 1.0 is GShard's
2T/E. First choices of every token take capacity before any second choice.

Combine weights (``--moe-normalize-gate-prob-before-dropping``, top2gating's option and
default): the raw gate values g1 = g[e1], g2 = g[e2] are
  after dropping (default):  masked by capacity (and by the random policy) first, then
                             w_k = g_k m_k / max(g1 m1 + g2 m2, eps) (m = 1 if kept), so a
                             token that lost its second slot keeps weight 1 on its first;
  before dropping:           w_k = g_k / max(g1 + g2, eps), then masked (GShard's Algorithm
                             1 order): a token that lost its second slot keeps g1 / (g1 + g2).
eps = ``torch.finfo(dtype).eps`` of the gate's dtype; a token with both slots dropped (or
padding) gets weights 0 and passes through the residual. Loss: the balance loss over first
choices before capacity.
"""

from dataclasses import dataclass, field

import torch

from moe_plugin.routing._softmax import LinearGateRouter, Selection
from moe_plugin.routing.interface import DROPPED, register_router

SECOND_EXPERT_POLICIES = ("all", "sampling", "random")


@dataclass
class GShardOptions:
    moe_second_expert_policy: str = field(
        default="all", metadata={"help": "gshard: second expert policy: all | sampling | random"}
    )
    moe_normalize_gate_prob_before_dropping: bool = field(
        default=False,
        metadata={"help": "gshard: divide the two gate values by their sum before capacity dropping "
                          "(GShard's Algorithm 1); default: after dropping, over the kept slots "
                          "(fairseq moe branch top2gating's default)"},
    )


@register_router(
    "gshard",
    options=GShardOptions,
    arch="gshard_lm",
    arch_defaults={"moe_top_k": 2, "moe_capacity_factor": 1.0},
)
class GShardRouter(LinearGateRouter):
    # route in the gate's precision (fp32 under --moe-gating-use-fp32, x's dtype otherwise),
    # jitter included, so that the renormalisation runs before the cast to x's dtype, as in
    # top2gating
    jitter_in_gate_precision = True

    def __init__(self, cfg, model_dim, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        self.top_k = 2
        self.second_expert_policy = cfg.moe_second_expert_policy
        self.normalize_before_dropping = bool(getattr(cfg, "moe_normalize_gate_prob_before_dropping", False))

    @staticmethod
    def validate(cfg) -> None:
        if cfg.moe_top_k != 2:
            raise ValueError(f"--moe-top-k: {cfg.moe_top_k} is not allowed for the gshard router; allowed: 2")
        if cfg.moe_expert_count < 2:
            raise ValueError(
                f"--moe-expert-count: {cfg.moe_expert_count} is not allowed for the gshard router; allowed: >= 2"
            )
        if cfg.moe_second_expert_policy not in SECOND_EXPERT_POLICIES:
            raise ValueError(
                f"--moe-second-expert-policy: {cfg.moe_second_expert_policy!r} is not allowed; "
                f"allowed: {', '.join(SECOND_EXPERT_POLICIES)}"
            )

    def select(self, probs_TE, logits_TE, top_k):
        """-> ids (T, 2) and the weights capacity will mask: normalised gate values when
        normalising before dropping, raw ones otherwise (:meth:`combine_weights` normalises
        them after dropping)."""
        g1_T, e1_T = probs_TE.max(dim=-1)
        first_TE = torch.nn.functional.one_hot(e1_T, self.num_experts).bool()
        policy = self.second_expert_policy if self.training else "all"
        if policy == "sampling":
            # standard Gumbel noise -log(-log(u)), u ~ U(0, 1) kept off 0 (torch.rand is < 1)
            u_TE = torch.rand_like(logits_TE).clamp(min=torch.finfo(logits_TE.dtype).tiny)
            gumbel_TE = -torch.log(-torch.log(u_TE))
            e2_T = (logits_TE + gumbel_TE).masked_fill(first_TE, float("-inf")).argmax(dim=-1)
        else:
            e2_T = probs_TE.masked_fill(first_TE, float("-inf")).argmax(dim=-1)
        g2_T = probs_TE.gather(1, e2_T.unsqueeze(1)).squeeze(1)
        if self.normalize_before_dropping:
            denom_T = (g1_T + g2_T).clamp(min=torch.finfo(probs_TE.dtype).eps)
            g1_T, g2_T = g1_T / denom_T, g2_T / denom_T
        if policy == "random":
            keep_T = 2.0 * g2_T > torch.rand_like(g2_T)
            e2_T = torch.where(keep_T, e2_T, torch.full_like(e2_T, DROPPED))
        return Selection(torch.stack([e1_T, e2_T], dim=1), torch.stack([g1_T, g2_T], dim=1))

    def combine_weights(self, weights_TK):
        """Normalising after dropping (the default): ``w_k = g_k m_k / max(g1 m1 + g2 m2, eps)``
        over the kept slots (capacity-dropped slots and padding are 0 already)."""
        if self.normalize_before_dropping:
            return weights_TK
        denom_T1 = weights_TK.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(weights_TK.dtype).eps)
        return weights_TK / denom_T1
