"""The MoE layer: router -> dispatch -> experts -> combine.

Legend: T tokens (flattened positions x batch), D model dim, E experts, K slots per token.

It replaces a Transformer FFN block's ``fc2(act(fc1(x)))``; the residual connection and
LayerNorm around it stay the decoder layer's. After each forward it keeps the router's
aux losses (``last_aux_losses``, differentiable, unweighted) and detached routing stats
(``last_stats``) for the criterion to collect; nothing lives in globals.

Composition happens once, at build time (:func:`build_moe_layer`): the router declares the
expert bank its output needs (``Router.expert_variant``: ``"ffn"``, or MultiHash's
``"segmented"``, :mod:`moe_plugin.experts`), the placement (:class:`ExpertPlacement`: all
experts here, or this rank's E/W in expert-parallel mode) decides which experts the bank
allocates and which dispatcher moves the tokens. No layer is rebuilt or sliced later.

The routers' ``expert_norm`` (``--hash-expert-norm``): ``y = LN(x + experts(x))`` with one
LayerNorm shared by the layer's experts (ParlAI's ``HashLayerFFN``), zero for tokens with
no expert; the decoder layer's own residual and LayerNorm then follow as usual.

Shared experts (``--moe-shared-experts N``; DeepSeekMoE, Dai et al. 2024, arXiv 2401.06066,
Sec. 3.2: ``h_t = sum_{shared i} FFN_i(u_t) + sum_{routed i} g_{i,t} FFN_i(u_t) + u_t``; public
code read: DeepSeek's ``modeling_deepseek.py`` ``DeepseekMoE``, which adds one MLP of hidden
``n_shared_experts * moe_intermediate_size`` to the routed output): N always-active
expert FFNs (:class:`moe_plugin.experts.SharedExpertBank`, hidden ``--moe-shared-expert-ffn-dim``,
default the routed experts') beside the routed ones, with any router. Every non-padding token
goes through all N; their sum is added with weight 1 to the routed combine output (after the
expert norm, which stays the routed experts' own), whether or not the router dropped the
token's slots. They are ordinary parameters: replicated on every worker in expert-parallel mode
(not marked ``param.expert``, so fairseq all-reduces their gradients like any shared weight),
and outside ``moe_plugin.utils.param_counts``'s expert banks (always active).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint

from moe_plugin.dispatch import ExpertPlacement, LocalDispatcher
from moe_plugin.experts import SegmentedExpertBank, SharedExpertBank, build_expert_bank, draw_seed, mix_seed
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
    """router -> dispatch -> experts -> combine (module docstring); ``dispatcher`` defaults to
    the local one (every expert here); ``shared_experts`` (a :class:`SharedExpertBank`, or None)
    are added to every non-padding token's output."""

    def __init__(self, router: Router, experts: nn.Module, dispatcher=None,
                 shared_experts: Optional[SharedExpertBank] = None):
        super().__init__()
        self.router = router
        self.experts = experts
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(router.num_experts)
        # --hash-expert-norm (module docstring): registered after the experts, as before
        self.expert_norm = nn.LayerNorm(router.model_dim) if getattr(router, "expert_norm", False) else None
        # set by the decoder: returns the TokenInfo of the current forward (or None)
        self.token_source: Optional[Callable[[], Optional[TokenInfo]]] = None
        self.last_aux_losses: Dict[str, torch.Tensor] = {}
        self.last_stats: Dict[str, torch.Tensor] = {}
        # the tape of the checkpointed forward in progress (None: not checkpointed)
        self._tape: Optional[RoutingTape] = None
        # --moe-shared-experts (module docstring): registered last, so the state_dict keys and
        # parameter order of a layer without them are unchanged
        self.shared_experts = shared_experts

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def placement(self) -> ExpertPlacement:
        """Which of the layer's experts this process holds (the dispatcher's)."""
        placement = getattr(self.dispatcher, "placement", None)
        return placement if placement is not None else ExpertPlacement(self.num_experts)

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
            return self.compute(x_TD, route, tape.tokens).reshape(shape)
        if tokens is None and self.token_source is not None:
            tokens = self.token_source()
        if tokens is not None and tokens.ids_T.shape[0] != x_TD.shape[0]:
            raise RuntimeError(
                f"MoE layer got {x_TD.shape[0]} hidden states but {tokens.ids_T.shape[0]} token ids"
            )
        if tokens is not None and tokens.incremental:
            refusal = self.router.causal_refusal()  # a mode that reads later tokens cannot generate
            if refusal:
                raise ValueError(refusal)
        if self.router.needs_tokens and tokens is None:
            raise RuntimeError(f"the {self.router.name} router needs token ids, and none reached the layer")
        route = self.router(x_TD, tokens=tokens)
        if tape is not None:
            tape.tokens = tokens
            tape.router_state = self.router.recompute_state(route)
            tape.recorded = True
        y_TD = self.compute(x_TD, route, tokens)
        self.last_aux_losses = route.aux_losses
        stats = dict(route.stats)
        devices = getattr(self.router, "simulated_devices", None)
        if devices is not None:
            # cross-device traffic (SAM): the dispatcher's figures, since it knows the devices
            valid_T = (
                ~tokens.pad_mask_T if tokens is not None
                else torch.ones(x_TD.shape[0], dtype=torch.bool, device=x_TD.device)
            )
            stats.update(self.dispatcher.traffic_stats(
                route.expert_ids_TK, valid_T, simulated_devices=devices, plain_ids_TK=route.plain_topk_ids_TK
            ))
        if tokens is not None:
            stats["num_tokens"] = (~tokens.pad_mask_T).sum().detach()
        else:
            stats["num_tokens"] = torch.tensor(x_TD.shape[0], device=x.device)
        self.last_stats = stats
        return y_TD.reshape(shape)

    def compute(self, x_TD: torch.Tensor, route, tokens: Optional[TokenInfo] = None) -> torch.Tensor:
        """dispatch -> experts -> combine for one routing decision -> (T, D) (then the
        expert norm, if any), plus the shared experts on the rows ``tokens`` does not mark as
        padding (every row without ``tokens``)."""
        combined = self._combined_impl(x_TD)
        if isinstance(self.experts, SegmentedExpertBank):
            # MultiHash: one one-slot dispatch per segment, inside the bank
            y_TD = self.experts.forward_segments(x_TD, route.expert_ids_TK, self.dispatcher)
        elif combined is not None:
            # gather -> FFN -> combine in one function: the gathered rows and the expert
            # outputs are not kept for backward (ExpertBank.forward_combined)
            y_TD = self.dispatcher.dispatch_compute_combine(
                x_TD, route.expert_ids_TK, route.weights_TK, self.experts, combined)
        else:
            x_ND, counts_E, plan = self.dispatcher.dispatch(x_TD, route.expert_ids_TK)
            y_ND = self.experts(x_ND, counts_E)
            y_TD = self.dispatcher.combine(y_ND, route.weights_TK, plan)
        if self.expert_norm is not None:
            routed_T1 = route.expert_ids_TK[:, :1] >= 0
            y_TD = torch.where(routed_T1, self.expert_norm(x_TD + y_TD), torch.zeros_like(y_TD))
        if self.shared_experts is not None:
            valid_T = None if tokens is None else ~tokens.pad_mask_T
            y_TD = y_TD + self.shared_experts(x_TD, valid_T)
        return y_TD


    def _combined_impl(self, x_TD: torch.Tensor) -> Optional[str]:
        """The bank's fused gather-FFN-combine implementation when this layer can use it
        (a dispatcher with ``dispatch_compute_combine``, i.e. local experts), else None."""
        if not hasattr(self.dispatcher, "dispatch_compute_combine"):
            return None
        combined = getattr(self.experts, "combined_impl", None)
        return combined(x_TD) if combined is not None else None


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


def layer_seed(cfg, layer_index: Optional[int]) -> int:
    """The seed of a layer's expert initialisation (:mod:`moe_plugin.experts`).

    ``cfg.moe_seed`` (fairseq's --seed) mixed with the decoder layer index when both are
    known; otherwise one seed drawn from the global RNG (which fairseq seeds from --seed),
    the same on every rank of a run.
    """
    seed = getattr(cfg, "moe_seed", None)
    if seed is not None and layer_index is not None:
        return mix_seed("moe_plugin.layer", int(seed), int(layer_index))
    return draw_seed()


def resolve_placement(cfg, placement: Optional[ExpertPlacement] = None, group=None) -> ExpertPlacement:
    """``placement`` if given; else, with ``cfg.moe_expert_parallel``, this process's rank of
    torch.distributed's ``group``; else every expert here."""
    if placement is not None:
        if placement.num_experts != cfg.moe_expert_count:
            raise ValueError(
                f"--moe-expert-count: {cfg.moe_expert_count} does not match the placement's "
                f"{placement.num_experts} experts"
            )
        return placement
    if getattr(cfg, "moe_expert_parallel", False):
        from moe_plugin.dispatch.expert_parallel import group_placement

        return group_placement(cfg.moe_expert_count, group)
    return ExpertPlacement(cfg.moe_expert_count)


def make_dispatcher(experts: nn.Module, placement: ExpertPlacement, group=None):
    """None (the layer's local dispatcher) for an unsharded placement; else the expert-parallel
    dispatcher, with the experts' parameters marked (``make_expert_parallel``)."""
    if not placement.is_sharded:
        return None
    if isinstance(experts, SegmentedExpertBank):
        raise ValueError("expert parallelism: MultiHash's segmented experts (--hash-multi > 1) are local only; "
                         "allowed: --hash-multi 1 with --moe-expert-parallel")
    # this rank's E/W experts, all-to-all dispatch (moe_plugin/dispatch/expert_parallel.py)
    from moe_plugin.dispatch.expert_parallel import make_expert_parallel

    return make_expert_parallel(experts, placement, group)


def build_moe_layer(
    cfg,
    model_dim: int,
    ffn_dim: int,
    activation: str = "relu",
    activation_dropout: float = 0.0,
    *,
    vocab: Optional[VocabInfo] = None,
    layer_index: Optional[int] = None,
    placement: Optional[ExpertPlacement] = None,
    group=None,
) -> MoELayer:
    """The standard MoE FFN: the configured router over the expert bank it declares.

    Builds only the experts ``placement`` gives this process (default: :func:`resolve_placement`),
    each initialised from its own generator (:func:`layer_seed`), so rank r of a W-rank build
    holds exactly the slice ``[r*E/W, (r+1)*E/W)`` of a one-process build of the same seed.
    The router is built first, from the global RNG as before; the experts draw from it at
    most one base seed (parameters built after the layer therefore see another global RNG
    state than when the bank drew every expert from it; the same on every rank and any W).
    """
    placement = resolve_placement(cfg, placement, group)
    router = build_router(cfg, model_dim, vocab=vocab, layer_index=layer_index)
    seed = layer_seed(cfg, layer_index)
    expert_dim = cfg.moe_expert_ffn_dim or ffn_dim
    experts = build_expert_bank(
        router.expert_variant,
        placement.per_rank,
        model_dim,
        expert_dim,
        activation=activation,
        activation_dropout=activation_dropout,
        first_expert=placement.first,
        seed=seed,
        num_segments=router.expert_segments,
    )
    shared = None
    num_shared = int(getattr(cfg, "moe_shared_experts", 0) or 0)
    if num_shared > 0:
        # all N on every rank (replicated, not sharded); seeded from the layer's seed, so
        # every rank and every world size builds the same values, and drawing nothing more
        # from the global RNG
        shared = SharedExpertBank(
            num_shared,
            model_dim,
            int(getattr(cfg, "moe_shared_expert_ffn_dim", 0) or 0) or expert_dim,
            activation=activation,
            activation_dropout=activation_dropout,
            seed=mix_seed("moe_plugin.shared_experts", seed),
        )
    # make_dispatcher marks only the routed bank's parameters param.expert
    return MoELayer(router, experts, make_dispatcher(experts, placement, group), shared_experts=shared)
