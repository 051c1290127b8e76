"""Switch Transformer routing (Fedus, Zoph, Shazeer 2021): top-1 softmax gate.

The chosen expert's output is scaled by its router probability; tokens over capacity are
dropped (their FFN output is zero, so the layer's residual carries them through). Losses:
the load-balancing loss ``E * sum_e f_e P_e`` and the optional router z-loss (weights set in
the criterion). Options: ``--moe-jitter-eps`` multiplies the router input by U(1-eps, 1+eps)
in training.

Router weights (``LinearGateRouter`` of ``moe_plugin/routing/_softmax.py``, the softmax
skeleton shared with gshard and sam): ``--moe-router-init switch`` (default) is the paper's
Sec. 2.4 initialisation, a truncated normal with std sqrt(s / D), s =
``--moe-router-init-scale`` = 0.1, cut at 2 std; ``linear`` is nn.Linear's default, what
fairseq's moe-branch gates get. The router input is cast to float32
(``--moe-gating-use-fp32``, the paper's "selective precision", Sec. 2.4).
"""

from dataclasses import dataclass, field

from moe_plugin.routing._softmax import LinearGateRouter, Selection
from moe_plugin.routing.interface import register_router


@dataclass
class SwitchOptions:
    moe_jitter_eps: float = field(
        default=0.0, metadata={"help": "switch/gshard: multiplicative router-input jitter in training (0 = off)"}
    )
    moe_router_init: str = field(
        default="switch",
        metadata={"help": "initialisation of the learned softmax gates (switch, gshard, sam): 'switch' "
                          "(Switch Transformer Sec. 2.4: truncated normal, std sqrt(s/D), cut at 2 std), "
                          "'linear' (nn.Linear's default, as fairseq's moe branch), 'xavier' (Xavier uniform, "
                          "as Hetu's SAM gate)"},
    )
    moe_router_init_scale: float = field(
        default=0.1, metadata={"help": "--moe-router-init switch: the scale s (Switch Transformer: 0.1)"}
    )
    moe_balance_scope: str = field(
        default="micro",
        metadata={"help": "frequencies f of Switch's balance loss E sum f_e P_e (switch, gshard, hyper with "
                          "--hyper-balance-loss): 'micro' (this micro-batch, as Switch/GShard) or 'global' (summed "
                          "over every rank and the update's micro-batches so far: Qiu et al. 2025, Megatron-Core "
                          "global_aux_loss)"},
    )


@register_router("switch", options=SwitchOptions, arch="switch_lm", arch_defaults={"moe_top_k": 1})
class SwitchRouter(LinearGateRouter):
    @staticmethod
    def validate(cfg) -> None:
        if cfg.moe_top_k != 1:
            raise ValueError(f"--moe-top-k: {cfg.moe_top_k} is not allowed for the switch router; allowed: 1")
        if not 0.0 <= cfg.moe_jitter_eps < 1.0:
            raise ValueError(f"--moe-jitter-eps: {cfg.moe_jitter_eps} is not allowed; allowed: 0 <= eps < 1")

    def select(self, probs_TE, logits_TE, top_k):
        """The most probable expert, weighted by its probability."""
        weight_T1, expert_T1 = probs_TE.max(dim=-1, keepdim=True)
        return Selection(expert_T1, weight_T1)
