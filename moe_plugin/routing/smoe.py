"""SMoE, the learned top-K baseline of HyperRouter's tables (Do et al., EMNLP 2023, arXiv
2312.07035): router `smoe`, arch `smoe_lm`.

Shape legend: T tokens, D model dimension, E experts, K experts per token (the K in use).

The reference's SMoE (giangdip2410/HyperRouter ``custom_gate.py`` ``CustomNaiveGate``, on
FastMoE) is a **trainable** ``Linear(D, E)`` gate **with a bias**, initialised by
``train.py`` ``weights_init`` (weight N(0, 0.02), i.e. ``--init_std 0.02``, bias 0):
``logits_TE = x_TD W_ED^T + b_E``; the K largest logits pick the experts; the combine
weights are a softmax over those K values (``moe_plugin/routing/_topk.py``). No balance
loss (``CustomNaiveGate`` has none; the balanced variant ``CustomNaiveGate_Balance`` is
another gate), no capacity and no token dropping (FastMoE sends every token to its K
experts). It is the top-K gate of Shazeer et al. without their noise and balance loss.

Which recipe (the reference's ``smoe_*`` scripts disagree): the version of
``script/table1/transformer_xl/smoe_enwik8.sh`` that trains ``CustomNaiveGate`` with
``--moe-num-expert 16 --moe-top-k 2`` and nothing else: a learned router at a fixed K = 2.
Other versions of ``smoe_enwik8.sh`` / ``smoe_wiki103.sh`` add ``--freeze_gate
--dynamic_moe ... 8 -> 16``, which is byte for byte the SMoE-Dropout recipe
(``smoe_dropout_wiki103.sh``; here ``smoe_dropout_lm``), and ``smoe_enwiki8.sh`` adds
``--dynamic_moe`` without ``--freeze_gate`` (here ``smoe_lm --moe-top-k-schedule
linear_increase --moe-top-k-min 8``). The fixed-K learned gate is what the paper's SMoE
baseline names, and the only version that differs from both other rows.

Arch defaults (``smoe_lm``): 16 experts in every layer, K = 2 in training (no schedule),
evaluation at K = E like every top-K arch (the reference's ``train.py`` validates every gate
at K = E and K = ``--moe-top-k`` and keeps the best K = E checkpoint; set
``--moe-eval-top-k 2`` to evaluate at the training K), no dropping.

Initialisation draws from the global RNG, which fairseq seeds with ``--seed`` before it
builds the model, as for every trainable parameter (and as the reference does).
"""

import torch
import torch.nn as nn

from moe_plugin.routing._topk import TopKSoftmaxRouter, validate_top_k_options
from moe_plugin.routing.hyper import TOPK_ARCH_DEFAULTS
from moe_plugin.routing.interface import register_router

#: the reference's weights_init (Transformer-XL's --init_std 0.02); the bias starts at 0
SMOE_GATE_INIT_STD = 0.02

#: ``make demo``: experts of size F/2 at K = 2 in every 2nd layer, evaluated at K = 2, like gshard_lm
SMOE_DEMO_ARGS = ["--moe-eval-top-k", "2", "--moe-freq", "2"]


@register_router("smoe", arch="smoe_lm", arch_defaults=dict(TOPK_ARCH_DEFAULTS), demo_args=list(SMOE_DEMO_ARGS))
class SMoERouter(TopKSoftmaxRouter):
    arch_schedule = "none"

    def __init__(self, cfg, model_dim: int, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        self.gate = nn.Linear(model_dim, self.num_experts, bias=True)
        with torch.no_grad():
            nn.init.normal_(self.gate.weight, mean=0.0, std=SMOE_GATE_INIT_STD)
            self.gate.bias.zero_()

    @staticmethod
    def validate(cfg) -> None:
        validate_top_k_options(cfg, "smoe")
