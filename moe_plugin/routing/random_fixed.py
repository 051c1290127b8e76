"""SMoE-Dropout (Chen, Zhang, Jaiswal, Liu, Wang, ICLR 2023): router `smoe_dropout`, arch `smoe_dropout_lm`.

Shape legend: T tokens, D model dimension, E experts, K experts per token (the K in use).

The router is a random ``Linear(D, E)``, N(0, 0.02), **frozen** at init:
``logits_TE = x_TD W_ED^T``; top-K logits; softmax over those K values; K rises during
training (``--moe-top-k-schedule``), which is the "dropout" of the method: early updates
train few experts per token, later ones more, and evaluation may use any K. This is the
baseline HyperRouter (Do et al., EMNLP 2023) argues against: a fixed random policy
(HyperRouter keeps a random hypernetwork but learns its input embedding).

Reference (giangdip2410/HyperRouter ``script/table1/transformer_xl/smoe_dropout_*.sh``):
``CustomNaiveGate`` (``custom_gate.py``: ``nn.Linear(d_model, E)``, with a bias) with
``--freeze_gate``, initialised by ``train.py`` ``weights_init`` (weight N(0, 0.02), bias 0).
A frozen zero bias adds nothing, so this gate has none. Arch defaults: the same recipe as
``hyper_lm`` (16 experts in every layer, K linear from E/2 to E over ``--max-update``,
evaluation at K = E, no dropping; ``moe_plugin/routing/hyper.py`` ``TOPK_ARCH_DEFAULTS`` and
``moe_plugin/routing/_topk.py``).

The gate is an ``nn.Parameter`` with ``requires_grad = False``: no gradient, no optimizer
state (fairseq's optimizer takes only parameters that require grad), saved in the
checkpoint. It is drawn from a local generator seeded by fairseq's ``--seed`` (or
``--moe-frozen-router-seed`` when set) and the layer index, independent of the global RNG
(the reference draws it from the global RNG after ``torch.manual_seed(--seed)``, so there
too another seed gives another random router). The gradient still flows into ``x``
through the combine weights, as in the reference (a frozen FastMoE gate).

Shared options (top-K schedule, evaluation K, seed) are declared once by the ``hyper``
router (:class:`moe_plugin.routing._topk.TopKScheduleOptions`); this router reads the same
fields. No aux loss (``z`` is returned with weight ``--moe-z-loss-weight``, 0 by default);
no token dropping by default (see ``_topk.py``).
"""

import torch
import torch.nn as nn

from moe_plugin.routing._topk import TopKSoftmaxRouter, frozen_router_seed, local_generator, validate_top_k_options
from moe_plugin.routing.hyper import TOPK_ARCH_DEFAULTS, TOPK_DEMO_ARGS
from moe_plugin.routing.interface import register_router

#: the reference's weights_init (Transformer-XL's --init_std 0.02)
RANDOM_GATE_STD = 0.02


@register_router(
    "smoe_dropout",
    arch="smoe_dropout_lm",
    arch_defaults=dict(TOPK_ARCH_DEFAULTS),
    demo_args=list(TOPK_DEMO_ARGS),
)
class SMoEDropoutRouter(TopKSoftmaxRouter):
    arch_schedule = "linear_increase"

    def __init__(self, cfg, model_dim: int, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        g = local_generator(frozen_router_seed(cfg), self.layer_index, salt=2)
        self.gate = nn.Linear(model_dim, self.num_experts, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(torch.randn(self.gate.weight.shape, generator=g) * RANDOM_GATE_STD)
        self.gate.requires_grad_(False)

    @staticmethod
    def validate(cfg) -> None:
        validate_top_k_options(cfg, "smoe_dropout")
