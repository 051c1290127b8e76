"""The MoE layer: router -> dispatch -> experts -> combine.

Legend: T tokens (flattened positions x batch), D model dim, E experts, K slots per token.

It replaces a Transformer FFN block's ``fc2(act(fc1(x)))``; the residual connection and
LayerNorm around it stay the decoder layer's. After each forward it keeps the router's
aux losses (``last_aux_losses``, differentiable, unweighted) and detached routing stats
(``last_stats``) for the criterion to collect; nothing lives in globals.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from moe_plugin.dispatch import LocalDispatcher
from moe_plugin.experts import ExpertBank
from moe_plugin.routing import Router, TokenInfo, VocabInfo, build_router


class MoELayer(nn.Module):
    def __init__(self, router: Router, experts: nn.Module, dispatcher=None):
        super().__init__()
        self.router = router
        self.experts = experts
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(router.num_experts)
        # set by the decoder: returns the TokenInfo of the current forward (or None)
        self.token_source: Optional[Callable[[], Optional[TokenInfo]]] = None
        self.last_aux_losses: Dict[str, torch.Tensor] = {}
        self.last_stats: Dict[str, torch.Tensor] = {}

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    def forward(self, x: torch.Tensor, tokens: Optional[TokenInfo] = None) -> torch.Tensor:
        """x: (..., D), e.g. fairseq's (T_seq, B, D). Returns the same shape."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        if tokens is None and self.token_source is not None:
            tokens = self.token_source()
        if tokens is not None and tokens.ids_T.shape[0] != x_TD.shape[0]:
            raise RuntimeError(
                f"MoE layer got {x_TD.shape[0]} hidden states but {tokens.ids_T.shape[0]} token ids"
            )
        if self.router.needs_tokens and tokens is None:
            raise RuntimeError(f"the {self.router.name} router needs token ids, and none reached the layer")
        route = self.router(x_TD, tokens=tokens)
        x_ND, counts_E, plan = self.dispatcher.dispatch(x_TD, route.expert_ids_TK)
        y_ND = self.experts(x_ND, counts_E)
        y_TD = self.dispatcher.combine(y_ND, route.weights_TK, plan)
        self.last_aux_losses = route.aux_losses
        stats = dict(route.stats)
        if tokens is not None:
            stats["num_tokens"] = (~tokens.pad_mask_T).sum().detach()
        else:
            stats["num_tokens"] = torch.tensor(x_TD.shape[0], device=x.device)
        self.last_stats = stats
        return y_TD.reshape(shape)


def build_moe_layer(
    cfg,
    model_dim: int,
    ffn_dim: int,
    activation: str = "relu",
    activation_dropout: float = 0.0,
    *,
    vocab: Optional[VocabInfo] = None,
    layer_index: Optional[int] = None,
) -> MoELayer:
    """The standard MoE FFN: the configured router over an :class:`ExpertBank`."""
    router = build_router(cfg, model_dim, vocab=vocab, layer_index=layer_index)
    experts = ExpertBank(
        cfg.moe_expert_count,
        model_dim,
        cfg.moe_expert_ffn_dim or ffn_dim,
        activation=activation,
        activation_dropout=activation_dropout,
    )
    # a router may need its own expert computation (hash_lm's MultiHash): it returns the layer
    layer = router.make_layer(experts) if hasattr(router, "make_layer") else None
    layer = layer if layer is not None else MoELayer(router, experts)
    if getattr(cfg, "moe_expert_parallel", False):
        # keep this rank's E/W experts, all-to-all dispatch (moe_plugin/parallel)
        from moe_plugin.parallel import make_expert_parallel

        make_expert_parallel(layer)
    return layer
