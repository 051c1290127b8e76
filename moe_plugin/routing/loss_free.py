"""Auxiliary-loss-free load balancing (Wang, Gao, Zhao, Sun, Dai 2024, arXiv 2408.15664),
with DeepSeek-V3's gate (DeepSeek-AI 2024, arXiv 2412.19437, Sec. 2.1.2).

Legend: T tokens (padding included), D model dim, E experts, K experts per token, B sequences.

Routing. ``s_TE = sigmoid(x W^T)`` (``--moe-router-score-function sigmoid``, DeepSeek-V3
eq. 15) or ``softmax(x W^T)`` (``softmax``, the Loss-Free Balancing paper's main gate);
each token's K experts are the top-K of the *biased* scores ``s_te + b_e``; the combine
weights are the *unbiased* scores of the chosen experts, ``g_tk = s_t,e_tk``, and with the
sigmoid and K > 1 they are renormalised over the K chosen (DeepSeek-V3 eq. 13:
``g_tk = s_tk / sum_j s_tj``). With K = 1 the sigmoid weight is not renormalised (it would
be 1 for every token and the gate would get no gradient from the LM loss; Megatron-Core's
``topk_softmax_with_capacity`` normalises sigmoid scores only when topk > 1, too).

The bias ``b_E`` (buffer ``expert_bias_E``) has no gradient and never enters the combine
weights. It is updated once per optimizer step (Loss-Free Balancing, Algorithm 1; DeepSeek-V3
"at the end of each step"):

    b_e += u * sign(mean_e' c_e' - c_e)

where ``c_e`` counts the tokens whose selection (before any capacity dropping; the archs are
dropless) chose e over the WHOLE update: every micro-batch of ``--update-freq`` and every
rank. ``u`` = ``--moe-router-bias-update-rate`` (Megatron-Core's name; default 1e-3, the
value of both papers); 0 keeps the bias at 0 (a plain sigmoid/softmax top-K router).

How the update is done on fairseq's path, without touching fairseq:

* each training forward adds its counts to ``pending_load_E`` (a buffer, so it is in every
  checkpoint); on more than one process they are summed over all ranks at once
  (``torch.distributed.all_reduce`` of E integers per MoE layer per micro-batch), so every
  rank, and rank 0's checkpoint, holds the counts of the whole update so far;
* fairseq calls ``set_num_updates(n)`` before every training forward (``train_step``), with
  n = the updates done so far; when n moves past the update the pending counts belong to
  (``pending_update``), the bias takes the step above and the counts are cleared. So the
  forwards of update n + 1 see the bias updated from the counts of update n: the update
  happens "after step n" in effect, only computed lazily;
* a resumed run loads the bias and the pending counts of the update that was saved and
  applies them before its first forward, exactly as an uninterrupted run; fairseq-eval-lm
  loads the bias and uses it frozen (an evaluation forward counts nothing);
* an update fairseq skips (fp16 overflow) does not move n: its counts join the next update's.

Outside fairseq, call ``set_num_updates`` once per optimizer step (as fairseq does) or the
bias never moves.

Sequence-wise balance loss (DeepSeek-V3 eqs. 17-20), optional (``--moe-seq-aux-loss``):
per sequence of T_b valid tokens, ``f_e = E / (K T_b) * #{t: e in top-K(t)}`` (no gradient),
``P_e = mean_t s'_te`` with ``s'_te = s_te / sum_e' s_te'``, loss ``sum_e f_e P_e``, averaged
over the sequences (1.0 when uniform). Returned as aux loss ``seq_balance``; its weight is
the criterion's (``--moe-loss-weights seq_balance=0.0001`` for DeepSeek-V3's alpha; without
it ``--moe-aux-loss-weight`` applies, default 0.01).

What is not here: DeepSeek-V3's node-limited routing (M nodes per token) and its routed
scaling factor (2.5) on the combine weights; Megatron-Core's grouped top-k. The gate
initialisation is ``--moe-router-init`` (the Switch truncated normal by default), as for the
other learned gates. Public code read: Megatron-Core ``megatron/core/transformer/moe/router.py``
(``TopKRouter`` with ``moe_router_enable_expert_bias``) and ``moe_utils.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moe_plugin.routing._softmax import LinearGateRouter, Selection, _world
from moe_plugin.routing.interface import register_router

SCORE_FUNCTIONS = ("sigmoid", "softmax")


@dataclass
class LossFreeOptions:
    moe_router_score_function: str = field(
        default="sigmoid",
        metadata={"help": "loss_free: expert scores, sigmoid (DeepSeek-V3) or softmax (the Loss-Free Balancing "
                          "paper's main gate)"},
    )
    moe_router_bias_update_rate: float = field(
        default=1e-3,
        metadata={"help": "loss_free: u in b_e += u * sign(mean load - load_e), once per optimizer step from the "
                          "counts of the whole update (all micro-batches, all ranks); 0 = no bias"},
    )
    moe_seq_aux_loss: bool = field(
        default=False,
        metadata={"help": "loss_free: also return DeepSeek-V3's sequence-wise balance loss 'seq_balance' (weight "
                          "--moe-loss-weights seq_balance=W, DeepSeek-V3: 0.0001)"},
    )


def sign_update(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """``bias + rate * sign(mean(load) - load)`` (Loss-Free Balancing, Algorithm 1)."""
    load_E = load_E.to(torch.float64)
    return bias_E + rate * torch.sign(load_E.mean() - load_E).to(bias_E.dtype)


def sequence_balance_loss(scores_TE, chosen_TK, valid_T, batch_size: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (module docstring); rows are ``t * B + b``."""
    T, E = scores_TE.shape
    K = chosen_TK.shape[1]
    seq_T = torch.arange(T, device=scores_TE.device) % batch_size
    w_T = valid_T.to(scores_TE.dtype)
    n_B = torch.zeros(batch_size, dtype=scores_TE.dtype, device=scores_TE.device).index_add_(0, seq_T, w_T)
    kept_TK = (chosen_TK >= 0) & valid_T.unsqueeze(-1)
    counts_BE = torch.zeros(batch_size * E, dtype=scores_TE.dtype, device=scores_TE.device)
    flat_TK = seq_T.unsqueeze(-1) * E + chosen_TK.clamp(min=0)
    counts_BE.index_add_(0, flat_TK.reshape(-1), kept_TK.reshape(-1).to(scores_TE.dtype))
    counts_BE = counts_BE.reshape(batch_size, E)
    norm_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp(min=torch.finfo(scores_TE.dtype).tiny)
    P_BE = torch.zeros(batch_size, E, dtype=scores_TE.dtype, device=scores_TE.device).index_add_(
        0, seq_T, norm_TE * w_T.unsqueeze(-1)
    )
    has_B = n_B > 0
    denom_B1 = n_B.clamp(min=1.0).unsqueeze(-1)
    f_BE = (E / K) * counts_BE.detach() / denom_B1
    per_seq_B = (f_BE * P_BE / denom_B1).sum(-1)
    return (per_seq_B * has_B.to(per_seq_B.dtype)).sum() / has_B.sum().clamp(min=1).to(per_seq_B.dtype)


@register_router(
    "loss_free",
    options=LossFreeOptions,
    arch="loss_free_lm",
    arch_defaults={"moe_top_k": 1, "moe_capacity_factor": math.inf, "moe_eval_capacity_factor": math.inf},
)
class LossFreeRouter(LinearGateRouter):
    """Top-K over biased sigmoid/softmax scores, the bias moved once per update (module docstring)."""

    balance_loss = False

    def __init__(self, cfg, model_dim: int, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        self.top_k = cfg.moe_top_k
        self.score_function = cfg.moe_router_score_function
        self.bias_update_rate = float(cfg.moe_router_bias_update_rate)
        self.seq_aux_loss = bool(cfg.moe_seq_aux_loss)
        E = self.num_experts
        self.register_buffer("expert_bias_E", torch.zeros(E, dtype=torch.float32))
        # counts of the update ``pending_update`` so far, summed over micro-batches and ranks
        self.register_buffer("pending_load_E", torch.zeros(E, dtype=torch.long))
        self.register_buffer("pending_update", torch.full((), -1, dtype=torch.long))
        self._updates_done = 0  # the n of fairseq's last set_num_updates (python: no sync)

    @staticmethod
    def validate(cfg) -> None:
        if cfg.moe_router_score_function not in SCORE_FUNCTIONS:
            raise ValueError(
                f"--moe-router-score-function: {cfg.moe_router_score_function!r} is not allowed; "
                f"allowed: {', '.join(SCORE_FUNCTIONS)}"
            )
        rate = cfg.moe_router_bias_update_rate
        if not (rate >= 0) or math.isinf(rate):
            raise ValueError(f"--moe-router-bias-update-rate: {rate} is not allowed; allowed: a finite number >= 0")
        if not 0.0 <= cfg.moe_jitter_eps < 1.0:
            raise ValueError(f"--moe-jitter-eps: {cfg.moe_jitter_eps} is not allowed; allowed: 0 <= eps < 1")

    # --- the once-per-update bias step ------------------------------------------------------
    def set_num_updates(self, num_updates: int) -> None:
        """fairseq calls this before every training forward with the updates done so far:
        once it moves past the update whose counts are pending, the bias takes its step."""
        super().set_num_updates(num_updates)
        n = int(num_updates)
        self._updates_done = n
        pending = int(self.pending_update)
        if pending >= 0 and pending != n:
            self.apply_pending_update()

    def apply_pending_update(self) -> None:
        """``b_e += u * sign(mean load - load_e)`` from the pending counts, then clear them."""
        with torch.no_grad():
            load_E = self.pending_load_E
            if self.bias_update_rate > 0 and int(load_E.sum()) > 0:
                self.expert_bias_E.copy_(sign_update(self.expert_bias_E, load_E, self.bias_update_rate))
            self.pending_load_E.zero_()
            self.pending_update.fill_(-1)

    # --- the skeleton's hooks -------------------------------------------------------------
    def scores(self, probs_TE, logits_TE):
        return torch.sigmoid(logits_TE) if self.score_function == "sigmoid" else probs_TE

    def select(self, probs_TE, logits_TE, top_k):
        scores_TE = self.scores(probs_TE, logits_TE)
        with torch.no_grad():
            biased_TE = scores_TE.detach() + self.expert_bias_E.to(scores_TE.dtype)
            ids_TK = biased_TE.topk(top_k, dim=-1, sorted=True).indices
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.score_function == "sigmoid" and top_k > 1:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp(min=torch.finfo(weights_TK.dtype).tiny)
        return Selection(ids_TK, weights_TK, extras={"scores_TE": scores_TE})

    def balance_losses(self, probs_TE, chosen_TK, valid_T, sel):
        if not (self.seq_aux_loss and self.training):
            return {}
        tokens = self.forward_tokens
        if tokens is None or tokens.batch_size is None:
            raise RuntimeError("--moe-seq-aux-loss: the sequence-wise balance loss needs the batch's sequences "
                               "(TokenInfo.batch_size), and none reached the router")
        return {"seq_balance": sequence_balance_loss(sel.extras["scores_TE"], chosen_TK, valid_T, tokens.batch_size)}

    def extra_stats(self, probs_TE, chosen_TK, routed_TK, valid_T, sel, aux):
        if self.training and not self._replay:  # a recompute (activation checkpointing) counts nothing
            ids = chosen_TK.reshape(-1)
            counts_E = torch.zeros(self.num_experts, dtype=torch.long, device=ids.device)
            counts_E.scatter_add_(0, ids.clamp(min=0), (ids >= 0).long())
            dist = _world()
            if dist is not None:
                dist.all_reduce(counts_E)
            self.pending_load_E += counts_E.to(self.pending_load_E.device)
            self.pending_update.fill_(self._updates_done)
        bias_E = self.expert_bias_E
        return {"bias_range": (bias_E.max() - bias_E.min()).detach().float()}


