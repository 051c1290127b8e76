"""GShard top-2 routing (Lepikhin et al. 2021, Algorithm 1).

First expert = argmax of the softmax gate; second = argmax over the others. Their gate
values are renormalised to sum to one. Second-expert policy (``--moe-second-expert-policy``):
  all      - always dispatch to the second expert;
  sampling - the second expert is sampled from the gate distribution without the first
             (Gumbel-max on the logits), in training;
  random   - keep the second expert with probability min(1, 2 * g2) (GShard's "random
             routing"), in training.
Evaluation always uses ``all`` so that evaluation is deterministic. Capacity is
``ceil(factor * 2 * T / E)``: factor 1.0 is GShard's 2T/E. First choices of every token
take capacity before any second choice. Loss: the balance loss over first choices.
"""

from dataclasses import dataclass, field

import torch

from moe_plugin.routing.interface import DROPPED, register_router
from moe_plugin.routing.softmax_topk import LinearGateRouter

SECOND_EXPERT_POLICIES = ("all", "sampling", "random")


@dataclass
class GShardOptions:
    moe_second_expert_policy: str = field(
        default="all", metadata={"help": "gshard: second expert policy: all | sampling | random"}
    )


@register_router(
    "gshard",
    options=GShardOptions,
    arch="gshard_lm",
    arch_defaults={"moe_top_k": 2, "moe_capacity_factor": 1.0},
)
class GShardRouter(LinearGateRouter):
    def __init__(self, cfg, model_dim, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        self.top_k = 2
        self.second_expert_policy = cfg.moe_second_expert_policy

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

    def select(self, probs_TE, logits_TE):
        g1_T, e1_T = probs_TE.max(dim=-1)
        first_TE = torch.nn.functional.one_hot(e1_T, self.num_experts).bool()
        policy = self.second_expert_policy if self.training else "all"
        if policy == "sampling":
            gumbel_TE = -torch.log(-torch.log(torch.rand_like(logits_TE).clamp(1e-20, 1.0)).clamp(min=1e-20))
            e2_T = (logits_TE + gumbel_TE).masked_fill(first_TE, float("-inf")).argmax(dim=-1)
        else:
            e2_T = probs_TE.masked_fill(first_TE, float("-inf")).argmax(dim=-1)
        g2_T = probs_TE.gather(1, e2_T.unsqueeze(1)).squeeze(1)
        denom_T = (g1_T + g2_T).clamp(min=torch.finfo(probs_TE.dtype).eps)
        g1n_T, g2n_T = g1_T / denom_T, g2_T / denom_T
        if policy == "random":
            keep_T = torch.rand_like(g2n_T) < (2.0 * g2n_T).clamp(max=1.0)
            e2_T = torch.where(keep_T, e2_T, torch.full_like(e2_T, DROPPED))
        return torch.stack([e1_T, e2_T], dim=1), torch.stack([g1n_T, g2n_T], dim=1)
