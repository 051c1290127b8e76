"""BASE layers (Lewis, Bhosale, Dettmers, Goyal, Zettlemoyer; ICML 2021, arXiv 2103.16716).

Legend: T tokens (positions x batch), D model dim, F expert hidden dim, E experts,
S sublayers per expert, N routed rows (sorted by expert).

A BASE layer is an extra block of the decoder stack (``--base-layers N`` inserts N of them,
at fairseq's positions: layer i of N goes to index ``((i + 1) * L) // (N + 1)`` of the
growing list of L decoder layers, as ``TransformerDecoderBase.build_output_projection``
does). For a token with hidden state h routed to expert e (``moe_plugin.routing.balanced``):

    y = alpha * f_e(h) + (1 - alpha) * h,   alpha = sigmoid(h . w_e)        (fairseq's code)

where f_e is a stack of ``--base-sublayers`` residual pre-LayerNorm FFN sublayers
``x + W2 act(W1 LN(x))`` with W2 zero-initialised (each expert starts as the identity). The
paper writes ``sigmoid(h . w_e) f_e(h) + h``; this module follows fairseq's code, whose
result is the same as ``h + alpha * (f_e(h) - h)``, which is how it is computed here: the
router's combine weight is alpha and the experts return ``f_e(h) - h``.

Differences from fairseq's ``BaseLayer`` (on purpose, see docs/base_layers.md): any number
of experts per process (``--moe-expert-count``), E local experts in one process or E/W per
worker in expert-parallel mode; the balanced assignment is PyTorch (no libbase) and works
for any T; train/eval is ``self.training`` (fairseq: ``requires_grad`` of the input);
padding tokens are not routed (they pass through unchanged).

``--base-shuffle`` (fairseq's flag and default, 1): in training on W > 1 workers, every real
token goes to a random worker before routing and comes back to its row after, as in
fairseq's ``BaseLayer.forward``, so that the batch a worker balances over is a random
sample of the global batch (moe_plugin/dispatch/shuffle.py: uneven token counts, padding,
the random numbers). Local and expert-parallel mode alike: the shuffle comes before the
layer's own dispatch. In one process, and in evaluation, nothing is shuffled: the balanced
assignment of a set of tokens does not depend on their order (up to ties), and fairseq
shuffles only in training. The routing stats of a shuffled forward (``moe.last_stats``:
tokens per expert, affinity, ``num_tokens``) describe the tokens this rank received.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.nn as nn

from moe_plugin.dispatch import ExpertPlacement
from moe_plugin.experts import BaseSublayerBank
from moe_plugin.moe_layer import MoELayer, checkpointed, layer_seed, make_dispatcher, resolve_placement
from moe_plugin.routing import ROUTER_REGISTRY, TokenInfo, VocabInfo, build_router


class BaseLayer(nn.Module):
    """One BASE layer: ``h + alpha * (f_e(h) - h)`` for every token (see the module docstring).

    ``moe`` is a :class:`MoELayer` (balanced router -> dispatch -> :class:`BaseSublayerBank`
    -> combine), so the criterion finds its stats like any MoE layer's. Its bank holds only
    the experts of ``placement`` (as :func:`moe_plugin.moe_layer.build_moe_layer`: default
    every expert, or this rank's E/W with ``--moe-expert-parallel``), initialised per expert. The forward takes
    and returns what fairseq's decoder loop passes to and expects from a decoder layer:
    ``(x, attn, None)`` with x of shape (T_seq, B, D).
    """

    def __init__(
        self,
        moe_cfg,
        model_dim: int,
        ffn_dim: int,
        num_sublayers: int = 1,
        activation: str = "relu",
        shuffle: bool = False,
        *,
        vocab: Optional[VocabInfo] = None,
        layer_index: Optional[int] = None,
        token_source: Optional[Callable[[], Optional[TokenInfo]]] = None,
        placement: Optional[ExpertPlacement] = None,
        group=None,
    ):
        super().__init__()
        if num_sublayers < 1:
            raise ValueError(f"--base-sublayers: {num_sublayers} is not allowed; allowed: >= 1")
        shared = int(getattr(moe_cfg, "moe_shared_experts", 0) or 0)
        if shared:  # the BASE block has no shared experts (docs/shared_experts.md)
            raise ValueError(
                f"--moe-shared-experts: {shared} is not allowed with BASE layers (--base-layers); allowed: 0 "
                "(shared experts are built in the MoE FFN layers only, not in BASE's extra blocks)"
            )
        cfg = dataclasses.replace(moe_cfg, moe_router="balanced", moe_top_k=1)
        ROUTER_REGISTRY["balanced"].validate(cfg)
        placement = resolve_placement(cfg, placement, group)
        router = build_router(cfg, model_dim, vocab=vocab, layer_index=layer_index)
        experts = BaseSublayerBank(placement.per_rank, model_dim, ffn_dim, num_sublayers, activation,
                                   first_expert=placement.first, seed=layer_seed(cfg, layer_index))
        self.moe = MoELayer(router, experts, make_dispatcher(experts, placement, group))
        self.moe.token_source = token_source
        self.shuffle = bool(shuffle)
        # the shuffle's random state (moe_plugin/dispatch/shuffle.py): fairseq's --seed, the
        # update count (set_num_updates) and the shuffles drawn since it last changed
        self.shuffle_seed = getattr(cfg, "moe_seed", None)
        self._shuffle_update, self._shuffle_count = 0, 0
        self.last_shuffle = None  # the plan of the last shuffled forward (diagnostics, tests)

    #: set by :func:`moe_plugin.models.base_layers.insert_base_layers` from --checkpoint-activations / --offload-activations
    checkpoint_activations = False
    offload_activations = False

    def forward(self, x: torch.Tensor, *args, **kwargs):
        incremental = kwargs.get("incremental_state", args[2] if len(args) > 2 else None) is not None
        # --base-shuffle: drawn here, once, so that a recompute in backward reuses it
        shuffle = self._shuffle_plan(x) if not incremental else None
        if self.checkpoint_activations and self.training and torch.is_grad_enabled() and not incremental:
            # recomputed in backward with the recorded assignment (moe_layer.checkpointed)
            return checkpointed(self._block, [self.moe], x, shuffle, offload=self.offload_activations), None, None
        return self._block(x, shuffle), None, None

    def _block(self, x: torch.Tensor, shuffle=None) -> torch.Tensor:
        return x + (self.moe(x) if shuffle is None else shuffle.run(self.moe, x))

    def set_num_updates(self, num_updates: int) -> None:
        """fairseq calls this before every training forward and on checkpoint load."""
        if int(num_updates) != self._shuffle_update:
            self._shuffle_update, self._shuffle_count = int(num_updates), 0

    def _shuffle_plan(self, x: torch.Tensor):
        """The token shuffle of this forward (moe_plugin/dispatch/shuffle.py), or None: only
        in training with --base-shuffle on more than one worker (fairseq shuffles only in
        training; in one process a shuffle changes no balanced assignment)."""
        from moe_plugin.dispatch import shuffle as shuffle_mod

        self.last_shuffle = None
        if not (self.shuffle and self.training) or shuffle_mod.dist_world_size() == 1:
            return None
        tokens = self.moe.token_source() if self.moe.token_source is not None else None
        seed = shuffle_mod.shuffle_seed(self.shuffle_seed, self.moe.router.layer_index, shuffle_mod.dist_rank(),
                                        self._shuffle_update, self._shuffle_count)
        self._shuffle_count += 1
        generator = shuffle_mod.shuffle_generator(seed)
        self.last_shuffle = shuffle_mod.plan_shuffle(x.shape[:-1].numel(), tokens, generator, x.device)
        return self.last_shuffle
