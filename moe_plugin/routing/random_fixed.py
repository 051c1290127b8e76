"""SMoE-Dropout (Chen, Zhang, Jaiswal, Liu, Wang, ICLR 2023): router `smoe_dropout`, arch `smoe_dropout_lm`.

Shape legend: T tokens, D model dimension, E experts, K experts per token (the K in use).

The router is a random ``Linear(D, E)`` (no bias), N(0, 0.02), **frozen** at init:
``logits_TE = x_TD W_ED^T``; top-K logits; softmax over those K values; K usually rises
during training (``--moe-top-k-schedule``), which is the "dropout" of the method: early
updates train few experts per token, later ones more, and evaluation may use any K.
This is the baseline HyperRouter (ROUTERS.md section 4) argues against: a fixed random
policy (HyperRouter keeps the random hypernetwork but learns its input embedding).

The gate is an ``nn.Parameter`` with ``requires_grad = False``: no gradient, no optimizer
state (fairseq's optimizer takes only parameters that require grad), saved in the
checkpoint. It is drawn from a local generator seeded by ``--moe-frozen-router-seed`` and
the layer index, independent of the global RNG. The gradient still flows into ``x`` through
the combine weights, as in the reference (a frozen FastMoE gate).

Shared options (top-K schedule, evaluation K, seed) are declared once by the ``hyper``
router (:class:`moe_plugin.routing._topk.TopKScheduleOptions`); this router reads the same
fields. No aux loss (``z`` is returned with weight ``--moe-z-loss-weight``, 0 by default);
no token dropping by default (see ``_topk.py``).
"""

import torch
import torch.nn as nn

from moe_plugin.routing._topk import TopKSoftmaxRouter, local_generator, validate_top_k_options
from moe_plugin.routing.hyper import TOPK_ARCH_DEFAULTS, TOPK_DEMO_ARGS
from moe_plugin.routing.interface import register_router

#: SMoE-Dropout / the HyperRouter reference: N(0, 0.02)
RANDOM_GATE_STD = 0.02


@register_router(
    "smoe_dropout",
    arch="smoe_dropout_lm",
    arch_defaults=dict(TOPK_ARCH_DEFAULTS),
    demo_args=list(TOPK_DEMO_ARGS),
)
class SMoEDropoutRouter(TopKSoftmaxRouter):
    def __init__(self, cfg, model_dim: int, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        g = local_generator(cfg.moe_frozen_router_seed, self.layer_index, salt=2)
        self.gate = nn.Linear(model_dim, self.num_experts, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(torch.randn(self.gate.weight.shape, generator=g) * RANDOM_GATE_STD)
        self.gate.requires_grad_(False)

    @staticmethod
    def validate(cfg) -> None:
        validate_top_k_options(cfg, "smoe_dropout")

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.use_fp32:
            return nn.functional.linear(x_TD.float(), self.gate.weight.float())
        return self.gate(x_TD)
