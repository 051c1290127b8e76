"""HyperRouter (Do, Le, Pham, et al., EMNLP 2023, arXiv 2312.07035): router `hyper`, arch `hyper_lm`.

Shape legend:
  T  tokens      D  model dimension      E  experts      K  experts per token (the K in use)
  Q  router-embedding dimension (--hyper-embed-dim)      H  hypernetwork hidden size (--hyper-hidden-dim)
  P  hypernetwork output size, E * (D + 1)

Per MoE layer (paper Sec. 3.2, eq. 5-6; reference: giangdip2410/HyperRouter ``custom_gate.py``
``HyperRouterGate``, initialised by ``train.py`` ``weights_init``):
  * a trainable embedding ``e_1Q`` (N(0, 1) init, the reference's ``torch.randn``);
  * a **frozen** hypernetwork ``H: Linear(Q, H) -> ReLU -> Linear(H, E*(D+1))`` (every Linear
    N(0, 0.02), zero bias: the reference's ``weights_init`` with ``--init_std 0.02``; frozen by
    ``train.py``, every parameter named ``hypernet``), generating on every forward
    ``[W | b] = H(e).reshape(E, D + 1)``: row e holds expert e's D router weights followed
    by its bias;
  * ``logits_TE = x_TD W_ED^T + b_E``; top-K logits; softmax over those K values
    (``moe_plugin.routing._topk``).
Only ``e`` learns (through the softmax over the chosen logits, so at K = 1 it receives a
zero gradient unless ``--hyper-balance-loss`` is on); ``H`` keeps its random init. ``H``
is a set of ``nn.Parameter`` with ``requires_grad = False``: fairseq builds its optimizer
from parameters with ``requires_grad`` only (``Trainer._build_optimizer``), so ``H`` has
no gradient and no optimizer state, yet it is in the ``state_dict`` and the checkpoint, so
evaluation generates exactly training's router.

Arch defaults (``hyper_lm``): the reference scripts' recipe
(``script/table1/transformer_xl/hyper_router_*.sh``): 16 experts in every layer
(``--moe_index 0,1,2,3`` of 4), ``--moe-top-k 2``, K rising linearly from E/2 to E over the
whole run (``--dynamic_moe_mode linear_increase --dynamic_overall_steps = --max_step
--moe-top-k-min 8 --moe-top-k-max 16``), evaluation at K = E, no token dropping; see
``moe_plugin/routing/_topk.py`` and docs/hyperrouter.md.

Choices where the reference is silent or inconsistent:
  * ``--hyper-hidden-dim`` (H) is a real option, default 256: the reference parses
    ``--hyper_size`` (its scripts pass 64) but never passes it on (``custom_layers.py`` would
    fail if it did), so every run used ``HyperRouterGate``'s default ``hyper_size=256``.
    0 = D.
  * ``--hyper-embed-dim`` (Q), default 0 = D (the reference ties Q to d_model).
  * Initialisation of ``H`` and ``e`` comes from a local generator seeded by fairseq's
    ``--seed`` (or ``--moe-frozen-router-seed`` when set) and the layer index, not from the
    global RNG: ``H`` is never trained, so it must not depend on what else was built before
    it (the reference draws it from the global RNG seeded by ``--seed``, so a different seed
    gives a different hypernetwork there too).
  * No aux loss by default (the reference has none); ``--hyper-balance-loss`` returns the
    Switch balance loss over first choices (weight ``--moe-aux-loss-weight``).
  * The generated router is computed in fp32 unless ``--moe-no-gating-fp32``.
Top-K schedule, evaluation K and capacity: see ``moe_plugin/routing/_topk.py``.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from moe_plugin.routing._topk import (
    TopKScheduleOptions,
    TopKSoftmaxRouter,
    frozen_router_seed,
    local_generator,
    validate_top_k_options,
)
from moe_plugin.routing.interface import register_router

#: the reference's init std of every Linear (Transformer-XL's --init_std 0.02)
HYPERNET_INIT_STD = 0.02

#: ``make demo`` (scripts/demo.py): the demo sizes every arch's experts F / K at the arch's
#: ``moe_top_k`` (2 here) and puts them in every 2nd layer, so the top-K archs train with K
#: rising 1 -> 3 over the demo's updates (reference rounding: mean K 1.995 over 200, 1.997 over 300
#: updates) in layers 1 and 3 and evaluate at K = 2: active compute matches gshard_lm's top-2.
#: (The arch defaults, 16 experts in every layer and K from 8 to 16, would cost 4-8 times the
#: compute of the other archs' demo rows.)
TOPK_DEMO_ARGS = [
    "--moe-top-k-schedule", "linear_increase", "--moe-top-k-min", "1", "--moe-top-k-max", "3",
    "--moe-top-k-schedule-updates", "{max_update}", "--moe-eval-top-k", "2", "--moe-freq", "2",
]
#: the reference scripts' setting shared by hyper_lm, smoe_dropout_lm and smoe_lm
#: (script/table1/transformer_xl/*.sh): ``--moe-num-expert 16 --moe-top-k 2``, an MoE FFN in
#: every layer (``--moe_index 0,1,2,3`` of 4 layers), and FastMoE never drops tokens. The
#: K schedule and evaluation K: moe_plugin/routing/_topk.py.
TOPK_ARCH_DEFAULTS = {
    "moe_top_k": 2,
    "moe_expert_count": 16,
    "moe_freq": 1,
    "moe_capacity_factor": float("inf"),
    "moe_eval_capacity_factor": float("inf"),
}


@dataclass
class HyperOptions(TopKScheduleOptions):
    """HyperRouter options plus the top-K schedule options it shares with ``smoe_dropout`` and ``smoe``."""

    hyper_embed_dim: int = field(
        default=0, metadata={"help": "hyper: dimension of the trainable router embedding; 0 = model dim"}
    )
    hyper_hidden_dim: int = field(
        default=256,
        metadata={
            "help": "hyper: hidden size of the frozen hypernetwork; 0 = model dim. Default 256: the size every "
            "reference run used (its --hyper_size is parsed but never reaches HyperRouterGate)"
        },
    )
    hyper_balance_loss: bool = field(
        default=False,
        metadata={"help": "hyper: add the Switch load-balancing loss (weight --moe-aux-loss-weight); off in the paper"},
    )


@register_router(
    "hyper",
    options=HyperOptions,
    arch="hyper_lm",
    arch_defaults=dict(TOPK_ARCH_DEFAULTS),
    demo_args=list(TOPK_DEMO_ARGS),
)
class HyperRouter(TopKSoftmaxRouter):
    arch_schedule = "linear_increase"

    @classmethod
    def balance_scope_supported(cls, cfg) -> bool:
        return bool(cfg.hyper_balance_loss)

    def __init__(self, cfg, model_dim: int, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        D, E = model_dim, self.num_experts
        Q = cfg.hyper_embed_dim or D
        H = cfg.hyper_hidden_dim or D
        self.balance_loss = bool(cfg.hyper_balance_loss)
        g = local_generator(frozen_router_seed(cfg), self.layer_index, salt=1)
        self.embedding_1Q = nn.Parameter(torch.randn(1, Q, generator=g))
        self.hypernet = nn.Sequential(nn.Linear(Q, H), nn.ReLU(), nn.Linear(H, E * (D + 1)))
        with torch.no_grad():
            for lin in (self.hypernet[0], self.hypernet[2]):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * HYPERNET_INIT_STD)
                lin.bias.zero_()
        self.hypernet.requires_grad_(False)

    @staticmethod
    def validate(cfg) -> None:
        validate_top_k_options(cfg, "hyper")
        for name in ("hyper_embed_dim", "hyper_hidden_dim"):  # 0 = model dim
            v = getattr(cfg, name)
            if v < 0:
                raise ValueError(f"--{name.replace('_', '-')}: {v} is not allowed; allowed: 0 (= model dim) or >= 1")

    def generate(self):
        """-> (W_ED, b_E): the router generated by the frozen hypernetwork from the embedding."""
        e_1Q = self.embedding_1Q
        lin1, lin2 = self.hypernet[0], self.hypernet[2]
        if self.use_fp32:
            h_1H = torch.relu(nn.functional.linear(e_1Q.float(), lin1.weight.float(), lin1.bias.float()))
            out_1P = nn.functional.linear(h_1H, lin2.weight.float(), lin2.bias.float())
        else:
            out_1P = self.hypernet(e_1Q)
        wb_ED1 = out_1P.reshape(self.num_experts, self.model_dim + 1)  # row e: [W_e (D) | b_e]
        return wb_ED1[:, :-1], wb_ED1[:, -1]

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        W_ED, b_E = self.generate()
        return self.gate_logits(x_TD, W_ED, b_E)
