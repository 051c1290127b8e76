"""The one skeleton of the softmax routers: switch, gshard, sam, and the top-K family
(hyper, smoe_dropout, smoe, in ``_topk.py``).

Legend: T tokens (padding included), D model dim, E experts, K slots per token (the K in use).

:meth:`SoftmaxRouter.forward` is the only forward these routers have. It defines, once:

* padding: rows whose token is padding (``tokens.pad_mask_T``) are not routed (id
  ``DROPPED``, weight 0), take no capacity and no part in the losses and stats;
* logits (hook :meth:`SoftmaxRouter.logits`), in fp32 under ``--moe-gating-use-fp32``
  (:meth:`SoftmaxRouter.gate_logits`), and the probabilities ``softmax(logits)`` over all E;
* selection (hook :meth:`SoftmaxRouter.select`): which K experts, with which weights;
* capacity (:meth:`SoftmaxRouter.capacity_for`): from the count of non-padding tokens,
  a 0-dim tensor, so nothing is read back from the device; ``None`` (no limit) for an
  infinite factor; dropping by :func:`moe_plugin.routing.interface.limit_capacity` (every
  token's first choice before any second choice, then token order);
* combine weights after dropping (hook :meth:`SoftmaxRouter.combine_weights`, GShard's
  renormalisation), then cast to x's dtype;
* aux losses: the balance-type losses (hook :meth:`SoftmaxRouter.balance_losses`; by
  default Switch's balance over first choices, or none) and the router z-loss ``z``; the
  scope of the balance loss's frequencies (``--moe-balance-scope``, :meth:`SoftmaxRouter.
  first_choice_frequencies`): this micro-batch, or the global batch;
* stats: ``tokens_per_expert`` and ``dropped_frac`` (kept slots of non-padding tokens),
  ``entropy``, then the router's own (hook :meth:`SoftmaxRouter.extra_stats`); the
  cross-device traffic figures are the dispatcher's (``moe_plugin/dispatch/placement.py``
  ``traffic_stats``), for a router that declares ``simulated_devices``.

A subclass defines how logits are made and how experts are selected, and nothing of the
rest unless its method says otherwise (SAM: its capacity rounding, losses and stats).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Dict, Optional

import torch
import torch.nn as nn

from moe_plugin.losses import router_z_loss, routing_entropy, switch_balance_loss
from moe_plugin.routing.interface import DROPPED, Router, RouterOutput, TokenInfo, capacity, limit_capacity

#: --moe-router-init values (see :func:`init_gate_weight_`)
ROUTER_INITS = ("switch", "linear", "xavier")
#: --moe-balance-scope values (see :meth:`SoftmaxRouter.first_choice_frequencies`)
BALANCE_SCOPES = ("micro", "global")


def _world():
    """torch.distributed when more than one process runs, else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def init_gate_weight_(weight_ED: torch.Tensor, scheme: str, scale: float) -> torch.Tensor:
    """Initialise a gate weight (E, D) in place; D = fan-in (the model dim).

    * ``switch`` (default): Switch Transformer Sec. 2.4 "Smaller parameter initialization
      for stability": a normal with mean 0 and std sigma = sqrt(s / D), s = ``scale`` (the
      paper's 0.1), truncated at +-2 sigma (sigma is the std before truncation, as in
      TensorFlow's ``truncated_normal`` and ``torch.nn.init.trunc_normal_``; the values'
      std is 0.88 sigma).
    * ``linear``: PyTorch's ``nn.Linear`` default (Kaiming uniform, a = sqrt(5), i.e.
      U(-1/sqrt(D), 1/sqrt(D))), which the gates of fairseq's moe branch get
      (``fairseq/modules/moe/top1gate.py`` / ``top2gate.py``: ``Linear(model_dim, E)``).
    * ``xavier``: Xavier/Glorot uniform, U(-sqrt(6 / (D + E)), +sqrt(6 / (D + E))), the
      default initializer of Hetu's SAM gate (``python/hetu/layers/SAMGate.py``).
    """
    if scheme not in ROUTER_INITS:
        raise ValueError(f"--moe-router-init: {scheme!r} is not allowed; allowed: {', '.join(ROUTER_INITS)}")
    if not (scale > 0) or math.isinf(scale):
        raise ValueError(f"--moe-router-init-scale: {scale} is not allowed; allowed: a finite number > 0")
    with torch.no_grad():
        if scheme == "switch":
            sigma = math.sqrt(scale / weight_ED.shape[1])
            nn.init.trunc_normal_(weight_ED, mean=0.0, std=sigma, a=-2.0 * sigma, b=2.0 * sigma)
        elif scheme == "linear":
            nn.init.kaiming_uniform_(weight_ED, a=math.sqrt(5))
        else:
            nn.init.xavier_uniform_(weight_ED)
    return weight_ED


@dataclasses.dataclass
class Selection:
    """What :meth:`SoftmaxRouter.select` chose, before padding and capacity.

    expert_ids_TK: (T, K) expert ids, slot 0 the best; ``DROPPED`` for a slot the selection
                   itself leaves empty (GShard's random policy).
    weights_TK:    (T, K) combine weights of those slots.
    extras:        router-specific tensors the router's loss and stat hooks read (SAM: the
                   chosen group ``group_T``).
    plain_topk_ids_TK: for a router that reports cross-device traffic (SAM), the (T, K) ids
                   plain top-K of the same probabilities would choose (no gradient); it
                   becomes :attr:`RouterOutput.plain_topk_ids_TK` (padding ``DROPPED``).
    """

    expert_ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    extras: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    plain_topk_ids_TK: Optional[torch.Tensor] = None


class SoftmaxRouter(Router):
    """The skeleton (see the module docstring). Subclasses implement :meth:`select` and,
    unless they keep an ``nn.Linear`` named ``gate``, :meth:`logits`."""

    #: whether :meth:`balance_losses` returns Switch's ``balance`` loss
    balance_loss: bool = True

    def __init__(self, cfg, model_dim: int, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        self.use_fp32 = cfg.moe_gating_use_fp32
        self.capacity_factor = cfg.moe_capacity_factor
        self.eval_capacity_factor = cfg.moe_eval_capacity_factor
        self.balance_scope = getattr(cfg, "moe_balance_scope", "micro")
        # --moe-balance-scope global: (E + 1,) first-choice counts and tokens of the update
        # ``_scope_update`` so far, summed over ranks; reset when fairseq's update count moves
        self._scope_counts: Optional[torch.Tensor] = None
        self._scope_update: Optional[int] = None
        self._last_scope_f: Optional[torch.Tensor] = None
        # inside a recompute under activation checkpointing (:meth:`replaying`): the state of
        # the recorded forward (the frequencies its balance loss used), else None
        self._replay_state = None
        self._replay = False
        # the current forward's TokenInfo (or None) and valid mask, for the hooks (forward)
        self.forward_tokens: Optional[TokenInfo] = None
        self.forward_valid_T: Optional[torch.Tensor] = None

    def causal_refusal(self) -> Optional[str]:
        if math.isinf(self.eval_capacity_factor):
            return None
        return (f"--moe-eval-capacity-factor: {self.eval_capacity_factor} is refused for generation (incremental "
                "decoding): a finite evaluation capacity drops tokens by the load of the whole batch, later tokens "
                "included, so a step would route differently from the full forward; allowed: inf (the default)")

    @classmethod
    def balance_scope_supported(cls, cfg) -> bool:
        """``--moe-balance-scope global`` works where the loss is Switch's over first choices."""
        return cls.balance_loss and cls.balance_losses is SoftmaxRouter.balance_losses

    def set_num_updates(self, num_updates: int) -> None:
        """fairseq calls this before every training forward: a new update starts the global
        batch's counts afresh."""
        if num_updates != self._scope_update:
            self._scope_update = int(num_updates)
            self._scope_counts = None

    def recompute_state(self, route):
        return {"scope_f": self._last_scope_f}

    @contextlib.contextmanager
    def replaying(self, state):
        previous = (self._replay, self._replay_state)
        self._replay, self._replay_state = True, state
        try:
            yield
        finally:
            self._replay, self._replay_state = previous

    def first_choice_frequencies(self, top1_T: torch.Tensor, valid_T: torch.Tensor) -> torch.Tensor:
        """(E,) share of valid tokens whose first choice is e, no gradient: Switch's ``f``.

        ``--moe-balance-scope micro`` (default): over this micro-batch on this rank, what
        Switch, GShard and fairseq's moe branch compute. ``global`` (Qiu et al. 2025,
        "Demons in the Detail", arXiv 2501.11873; Megatron-Core ``global_aux_loss``): the
        counts are summed over every rank (one all-reduce of E + 1 numbers per MoE layer per
        micro-batch) and over the micro-batches of the current update seen so far (a buffer
        reset when fairseq's update count moves), so micro-batch j of ``--update-freq k`` uses
        the counts of micro-batches 1..j of every rank; the last one, the whole update's. The
        probabilities ``P`` stay this micro-batch's (they carry the gradient).
        """
        E = self.num_experts
        w_T = valid_T.to(torch.float32)
        counts = torch.zeros(E + 1, dtype=torch.float32, device=top1_T.device)
        counts[:E].index_add_(0, top1_T, w_T)
        counts[E] = w_T.sum()
        if self.balance_scope == "global" and self.training:
            if self._replay:
                # a recompute: the very frequencies of the recorded forward (the backward of
                # its balance loss reads them from the recompute)
                f_E = (self._replay_state or {}).get("scope_f")
                if f_E is not None:
                    return f_E
            else:
                dist = _world()
                if dist is not None:
                    dist.all_reduce(counts)
                self._scope_counts = counts if self._scope_counts is None else self._scope_counts + counts
                counts = self._scope_counts
        f_E = (counts[:E] / counts[E].clamp(min=1.0)).detach()
        self._last_scope_f = f_E
        return f_E

    # --- hooks --------------------------------------------------------------------------
    def gate_logits(self, x_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: Optional[torch.Tensor] = None):
        """``x W^T (+ b)`` -> logits_TE, in fp32 under ``--moe-gating-use-fp32`` (the Switch
        Transformer's "selective precision", Sec. 2.4), else in x's dtype."""
        dtype = torch.float32 if self.use_fp32 else x_TD.dtype
        bias_E = None if bias_E is None else bias_E.to(dtype)
        return nn.functional.linear(x_TD.to(dtype), weight_ED.to(dtype), bias_E)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """-> logits_TE. Default: the router's ``nn.Linear`` ``self.gate``."""
        return self.gate_logits(x_TD, self.gate.weight, self.gate.bias)

    def select(self, probs_TE: torch.Tensor, logits_TE: torch.Tensor, top_k: int) -> Selection:
        """Choose ``top_k`` experts per token (every row; padding is masked afterwards)."""
        raise NotImplementedError

    def capacity_rule(self, num_tokens, num_experts: int, top_k: int, factor: float):
        """Slots per expert for ``num_tokens`` non-padding tokens at a finite ``factor``."""
        return capacity(num_tokens, num_experts, top_k, factor)

    def capacity_for(self, num_valid):
        """Slots per expert in the current mode (``--moe-capacity-factor`` in training,
        ``--moe-eval-capacity-factor`` in evaluation); None: no limit (factor inf).
        ``num_valid`` may be a 0-dim tensor (the result is then a tensor)."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if math.isinf(factor):
            return None
        return self.capacity_rule(num_valid, self.num_experts, self.top_k, factor)

    def combine_weights(self, weights_TK: torch.Tensor) -> torch.Tensor:
        """The weights after dropping (dropped slots are 0), in the gate's dtype. Default: as they are."""
        return weights_TK

    def balance_losses(self, probs_TE, chosen_TK, valid_T, sel: Selection) -> Dict[str, torch.Tensor]:
        """Balance-type aux losses. ``chosen_TK``: selected ids with padding ``DROPPED``,
        before capacity. Default: Switch's ``balance`` over first choices if :attr:`balance_loss`."""
        if not self.balance_loss:
            return {}
        top1_T = chosen_TK[:, 0].clamp(min=0)
        f_E = self.first_choice_frequencies(top1_T, valid_T)
        return {"balance": switch_balance_loss(probs_TE, top1_T, valid_T, f_E=f_E)}

    def extra_stats(self, probs_TE, chosen_TK, routed_TK, valid_T, sel: Selection, aux) -> Dict[str, torch.Tensor]:
        """Router-specific detached stats (called under no_grad; ``probs_TE`` detached)."""
        return {}

    # --- the forward --------------------------------------------------------------------
    def forward(self, x_TD: torch.Tensor, *, tokens: Optional[TokenInfo] = None) -> RouterOutput:
        T = x_TD.shape[0]
        if tokens is not None:
            valid_T = ~tokens.pad_mask_T
            num_valid = valid_T.sum()  # a tensor: the capacity is computed on the device
        else:
            valid_T = torch.ones(T, dtype=torch.bool, device=x_TD.device)
            num_valid = T
        # what the hooks of this forward may read (Sinkhorn's marginals leave padding out;
        # loss_free's sequence-wise loss needs the sequences); cleared when the forward ends
        self.forward_tokens, self.forward_valid_T = tokens, valid_T
        try:
            return self._forward(x_TD, tokens, valid_T, num_valid)
        finally:
            self.forward_tokens = self.forward_valid_T = None

    def _forward(self, x_TD, tokens, valid_T, num_valid) -> RouterOutput:
        K = self.top_k
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        sel = self.select(probs_TE, logits_TE, K)
        # padding tokens are not routed: they take no capacity and produce nothing
        chosen_TK = sel.expert_ids_TK.masked_fill(~valid_T.unsqueeze(-1), DROPPED)
        cap = self.capacity_for(num_valid)
        routed_TK, weights_TK, stats = limit_capacity(chosen_TK, sel.weights_TK, self.num_experts, cap)
        weights_TK = self.combine_weights(weights_TK)

        aux = self.balance_losses(probs_TE, chosen_TK, valid_T, sel)
        aux["z"] = router_z_loss(logits_TE, valid_T)
        with torch.no_grad():
            probs_TE = probs_TE.detach()
            stats["entropy"] = routing_entropy(probs_TE, valid_T)
            stats.update(self.extra_stats(probs_TE, chosen_TK, routed_TK, valid_T, sel, aux))
        out = RouterOutput(routed_TK, weights_TK.to(x_TD.dtype), aux, stats)
        if sel.plain_topk_ids_TK is not None:
            out.plain_topk_ids_TK = sel.plain_topk_ids_TK.masked_fill(~valid_T.unsqueeze(-1), DROPPED)
        return out


class LinearGateRouter(SoftmaxRouter):
    """A learned ``Linear(D, E)`` gate without bias (switch, gshard, sam): initialised by
    ``--moe-router-init`` (:func:`init_gate_weight_`), with Switch's multiplicative input
    jitter U(1 - eps, 1 + eps) in training (``--moe-jitter-eps``)."""

    #: cast the gate input to fp32 (under --moe-gating-use-fp32) before the jitter, as GShard
    #: does (fairseq's top2gating routes in the gate's precision); Switch jitters in x's dtype
    jitter_in_gate_precision: bool = False

    def __init__(self, cfg, model_dim: int, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        self.gate = nn.Linear(model_dim, self.num_experts, bias=False)
        init_gate_weight_(
            self.gate.weight, getattr(cfg, "moe_router_init", "switch"), getattr(cfg, "moe_router_init_scale", 0.1)
        )
        self.jitter_eps = getattr(cfg, "moe_jitter_eps", 0.0)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.jitter_in_gate_precision and self.use_fp32:
            x_TD = x_TD.float()
        if self.training and self.jitter_eps > 0:
            # Switch Transformer's multiplicative input jitter
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            x_TD = x_TD * noise
        return super().logits(x_TD)
