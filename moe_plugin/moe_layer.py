"""The MoE layer: router -> dispatch -> experts -> combine.

Legend: T tokens (flattened positions x batch), D model dim, E experts, K slots per token.

It replaces a Transformer FFN block's ``fc2(act(fc1(x)))``; the residual connection and
LayerNorm around it stay the decoder layer's. After each forward it keeps the router's
aux losses (``last_aux_losses``, differentiable, unweighted) and detached routing stats
(``last_stats``) for the criterion to collect; nothing lives in globals.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint

from moe_plugin.dispatch import LocalDispatcher
from moe_plugin.experts import ExpertBank
from moe_plugin.routing import Router, TokenInfo, VocabInfo, build_router


class RoutingTape:
    """What one forward of an MoE layer decided, so that its recompute routes exactly alike.

    Under activation checkpointing (:func:`checkpointed`) fairseq's backward re-runs the
    layer. The recompute must see the same token ids (the decoder's token context is gone by
    then), the same padding (hence the same capacity) and the same experts (BASE's
    warm-started assignment must not be solved again from moved prices); the random parts
    (jitter, GShard's sampled second expert, dropout) repeat because the checkpoint restores
    the RNG state. The first forward records; every later one replays.
    """

    __slots__ = ("recorded", "tokens", "router_state")

    def __init__(self):
        self.recorded = False
        self.tokens: Optional[TokenInfo] = None
        self.router_state = None


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
        # the tape of the checkpointed forward in progress (None: not checkpointed)
        self._tape: Optional[RoutingTape] = None

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @contextlib.contextmanager
    def recording(self, tape: RoutingTape):
        """Record into ``tape`` on its first forward inside this scope, replay it afterwards."""
        previous, self._tape = self._tape, tape
        try:
            yield
        finally:
            self._tape = previous

    def forward(self, x: torch.Tensor, tokens: Optional[TokenInfo] = None) -> torch.Tensor:
        """x: (..., D), e.g. fairseq's (T_seq, B, D). Returns the same shape."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        tape = self._tape
        if tape is not None and tape.recorded:
            # a recompute in backward: route as the recorded forward did; the criterion has
            # already read that forward's aux losses and stats, so they are left alone
            with self.router.replaying(tape.router_state):
                route = self.router(x_TD, tokens=tape.tokens)
            return self.compute(x_TD, route).reshape(shape)
        if tokens is None and self.token_source is not None:
            tokens = self.token_source()
        if tokens is not None and tokens.ids_T.shape[0] != x_TD.shape[0]:
            raise RuntimeError(
                f"MoE layer got {x_TD.shape[0]} hidden states but {tokens.ids_T.shape[0]} token ids"
            )
        if self.router.needs_tokens and tokens is None:
            raise RuntimeError(f"the {self.router.name} router needs token ids, and none reached the layer")
        route = self.router(x_TD, tokens=tokens)
        if tape is not None:
            tape.tokens = tokens
            tape.router_state = self.router.recompute_state(route)
            tape.recorded = True
        y_TD = self.compute(x_TD, route)
        self.last_aux_losses = route.aux_losses
        stats = dict(route.stats)
        if tokens is not None:
            stats["num_tokens"] = (~tokens.pad_mask_T).sum().detach()
        else:
            stats["num_tokens"] = torch.tensor(x_TD.shape[0], device=x.device)
        self.last_stats = stats
        return y_TD.reshape(shape)

    def compute(self, x_TD: torch.Tensor, route) -> torch.Tensor:
        """dispatch -> experts -> combine for one routing decision -> (T, D)."""
        x_ND, counts_E, plan = self.dispatcher.dispatch(x_TD, route.expert_ids_TK)
        y_ND = self.experts(x_ND, counts_E)
        return self.dispatcher.combine(y_ND, route.weights_TK, plan)


def checkpointed(function: Callable, moe_layers, *args, offload: bool = False, **kwargs):
    """``function(*args, **kwargs)`` under activation checkpointing, for a block holding MoE layers.

    PyTorch's non-reentrant checkpoint (``use_reentrant=False``): the forward runs with
    autograd on, so the aux losses the criterion reads from ``last_aux_losses`` keep their
    gradient (fairseq's own ``checkpoint_wrapper`` runs the first forward under ``no_grad``,
    which would silently cut the balance, z and SAM losses off from training); its saved
    activations are dropped and recomputed in backward, where every MoE layer of the block
    replays its :class:`RoutingTape`. The RNG state is restored for the recompute.

    ``offload``: keep the block's input on the CPU until backward needs it (fairseq's
    ``--offload-activations``); on a CPU run it changes nothing.
    """
    tapes = [RoutingTape() for _ in moe_layers]
    x = args[0]
    device = x.device
    if offload:
        # the copy's backward only moves the gradient back; nothing on the device is kept
        args = (x.to("cpu"),) + tuple(args[1:])

    def run(x_in, *rest, **kw):
        if offload:
            x_in = x_in.to(device, non_blocking=True)
        with contextlib.ExitStack() as stack:
            for layer, tape in zip(moe_layers, tapes):
                stack.enter_context(layer.recording(tape))
            return function(x_in, *rest, **kw)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


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
        # keep this rank's E/W experts, all-to-all dispatch (moe_plugin/dispatch/expert_parallel.py)
        from moe_plugin.dispatch.expert_parallel import make_expert_parallel

        make_expert_parallel(layer)
    return layer
