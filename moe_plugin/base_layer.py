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
import torch.nn.functional as F_

from moe_plugin.experts import ExpertBank, expert_of_rows
from moe_plugin.moe_layer import MoELayer, checkpointed
from moe_plugin.routing import ROUTER_REGISTRY, TokenInfo, VocabInfo, build_router


class BaseSublayerBank(nn.Module):
    """E BASE experts with batched weights; expert e maps x to ``f_e(x) - x``.

    f_e = S residual sublayers ``x + W2 act(W1 LN(x))`` (fairseq's ``BaseSublayer``): per
    sublayer a LayerNorm (``ln_weight_ESD``/``ln_bias_ESD``, eps 1e-5) and an
    :class:`ExpertBank` FFN computed by grouped matmul over rows sorted by expert. W2 starts
    at zero, its bias and W1 as ``nn.Linear`` (fairseq zeroes ``ff2.weight`` only).
    Every parameter has the expert dimension first, so expert parallelism can shard it.
    """

    def __init__(
        self,
        num_experts: int,
        model_dim: int,
        ffn_dim: int,
        num_sublayers: int = 1,
        activation: str = "relu",
        impl: str = "auto",
    ):
        super().__init__()
        E, D, S = num_experts, model_dim, num_sublayers
        self.num_experts, self.model_dim, self.num_sublayers = E, D, S
        self.ln_weight_ESD = nn.Parameter(torch.ones(E, S, D))
        self.ln_bias_ESD = nn.Parameter(torch.zeros(E, S, D))
        self.ffns = nn.ModuleList(
            [ExpertBank(E, D, ffn_dim, activation=activation, activation_dropout=0.0, impl=impl) for _ in range(S)]
        )
        for bank in self.ffns:
            with torch.no_grad():
                bank.w2_EFD.zero_()

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND: rows sorted by expert, ``counts_E[e]`` rows for expert e -> f(x) - x, (N, D)."""
        N, D = x_ND.shape
        if N == 0:
            # keep every parameter in the graph (distributed gradient reduction)
            return x_ND.new_zeros(0, D) + 0.0 * sum(p.sum() for p in self.parameters())
        # tail rows (dropped slots, sorted last) borrow the last expert's LayerNorm; the
        # banks give them zero output and zero gradient
        expert_N = expert_of_rows(counts_E, N).clamp(max=self.num_experts - 1)
        h_ND = x_ND
        delta_ND = None
        for s, bank in enumerate(self.ffns):
            z_ND = F_.layer_norm(h_ND, (D,), eps=1e-5)
            ln_w_ND = self.ln_weight_ESD[:, s].index_select(0, expert_N).to(z_ND.dtype)
            z_ND = torch.addcmul(self.ln_bias_ESD[:, s].index_select(0, expert_N).to(z_ND.dtype), z_ND, ln_w_ND)
            u_ND = bank(z_ND, counts_E)
            delta_ND = u_ND if delta_ND is None else delta_ND + u_ND
            h_ND = x_ND + delta_ND
        return delta_ND

    def forward_loop(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The slow obvious reference: a Python loop over experts and sublayers."""
        out = []
        n = int(counts_E.sum())
        for e, x in enumerate(torch.split(x_ND[:n], counts_E.tolist())):
            h = x
            for s, bank in enumerate(self.ffns):
                z = F_.layer_norm(h, (self.model_dim,), self.ln_weight_ESD[e, s], self.ln_bias_ESD[e, s], eps=1e-5)
                z = bank.activation(z @ bank.w1_EDF[e] + bank.b1_EF[e])
                h = h + z @ bank.w2_EFD[e] + bank.b2_ED[e]
            out.append(h - x)
        out.append(x_ND.new_zeros(x_ND.shape[0] - n, self.model_dim))  # the tail
        return torch.cat(out, 0)


class BaseLayer(nn.Module):
    """One BASE layer: ``h + alpha * (f_e(h) - h)`` for every token (see the module docstring).

    ``moe`` is a :class:`MoELayer` (balanced router -> dispatch -> :class:`BaseSublayerBank`
    -> combine), so the criterion finds its stats like any MoE layer's. The forward takes
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
    ):
        super().__init__()
        if num_sublayers < 1:
            raise ValueError(f"--base-sublayers: {num_sublayers} is not allowed; allowed: >= 1")
        cfg = dataclasses.replace(moe_cfg, moe_router="balanced", moe_top_k=1)
        ROUTER_REGISTRY["balanced"].validate(cfg)
        router = build_router(cfg, model_dim, vocab=vocab, layer_index=layer_index)
        experts = BaseSublayerBank(cfg.moe_expert_count, model_dim, ffn_dim, num_sublayers, activation)
        self.moe = MoELayer(router, experts)
        if getattr(cfg, "moe_expert_parallel", False):
            from moe_plugin.dispatch.expert_parallel import make_expert_parallel

            make_expert_parallel(self.moe)
        self.moe.token_source = token_source
        self.shuffle = bool(shuffle)
        # the shuffle's random state (moe_plugin/dispatch/shuffle.py): fairseq's --seed, the
        # update count (set_num_updates) and the shuffles drawn since it last changed
        self.shuffle_seed = getattr(cfg, "moe_seed", None)
        self._shuffle_update, self._shuffle_count = 0, 0
        self.last_shuffle = None  # the plan of the last shuffled forward (diagnostics, tests)

    #: set by :func:`insert_base_layers` from --checkpoint-activations / --offload-activations
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


def _get(cfg, name, default=None):
    value = getattr(cfg, name, None)
    return default if value is None else value


def insert_base_layers(decoder, cfg) -> None:
    """Insert ``cfg.base_layers`` BASE layers into ``decoder.layers`` at fairseq's positions.

    ``decoder`` is a :class:`moe_plugin.models.moe_lm.MoETransformerDecoder` (its
    ``moe_cfg``, ``token_context``, ``vocab_info``, ``embed_dim``); ``cfg`` its fairseq
    config (TransformerConfig or the flat Namespace).
    """
    num = int(_get(cfg, "base_layers", 0))
    if num < 0:
        raise ValueError(f"--base-layers: {num} is not allowed; allowed: >= 0")
    if num == 0:
        return
    sublayers = int(_get(cfg, "base_sublayers", 1))
    ffn_dim = decoder.moe_cfg.moe_expert_ffn_dim or int(_get(cfg, "decoder_ffn_embed_dim"))
    activation = str(_get(cfg, "activation_fn", "relu"))
    shuffle = bool(_get(cfg, "base_shuffle", False))
    num_layers = len(decoder.layers)
    for i in range(num):
        layer = BaseLayer(
            decoder.moe_cfg,
            decoder.embed_dim,
            ffn_dim,
            sublayers,
            activation,
            shuffle,
            vocab=decoder.vocab_info,
            token_source=decoder.token_context.get,
        )
        decoder.layers.insert(((i + 1) * num_layers) // (num + 1), layer)
    for index, layer in enumerate(decoder.layers):
        if isinstance(layer, BaseLayer):
            layer.moe.router.layer_index = index
            layer.checkpoint_activations = bool(_get(cfg, "checkpoint_activations", False))
            layer.offload_activations = bool(_get(cfg, "offload_activations", False))


def base_layer_positions(num_layers: int, num_base: int):
    """Final indices of the BASE layers in the decoder stack (fairseq's insertion rule)."""
    layers = ["x"] * num_layers
    for i in range(num_base):
        layers.insert(((i + 1) * num_layers) // (num_base + 1), "base")
    return [i for i, kind in enumerate(layers) if kind == "base"]
