"""The router seam: what every routing scheme takes and returns.

Shape legend (used in every tensor name of this package):
  T  tokens in the flattened batch (sequence positions x batch, padding included)
  D  model dimension            E  experts in the layer
  K  expert slots per token     V  vocabulary size

A router maps hidden states ``x_TD`` (and, keyword-only, the token ids of those positions)
to a :class:`RouterOutput`. It knows nothing about experts or dispatch: the MoE layer hands
its output to a dispatcher and an expert bank. Adding a routing scheme is one new file in
this package that subclasses :class:`Router` and calls :func:`register_router`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Dict, List, Optional, Type

import torch
import torch.nn as nn

# Expert id marking a slot that carries no expert (dropped by capacity, or a padding token).
DROPPED = -1


@dataclasses.dataclass
class TokenInfo:
    """Token ids aligned with the rows of ``x_TD`` (row ``t * B + b`` is position t of sequence b).

    ``prev_ids_T``/``next_ids_T`` hold the neighbouring tokens in the same sequence
    (``pad`` outside it); ``next_ids_T`` is None when the future is unknown (incremental
    decoding). ``positions_T`` are 0-based positions within the sequence. ``batch_size`` is
    B, the number of sequences, so row ``r`` belongs to sequence ``r % B`` (None when the
    caller does not know it; a sequence-wise loss then refuses to run).
    """

    ids_T: torch.Tensor
    prev_ids_T: torch.Tensor
    positions_T: torch.Tensor
    pad_mask_T: torch.Tensor
    next_ids_T: Optional[torch.Tensor] = None
    incremental: bool = False
    batch_size: Optional[int] = None


@dataclasses.dataclass
class VocabInfo:
    """What a router may know of the vocabulary at build time (hash tables need it).

    ``counts_V`` are token frequencies of the training data, or None when unknown, and
    ``counts_source`` says where they come from:

    * ``"train split"``: counted in the binarised training split (every symbol, ``<unk>``
      and ``</s>`` included, at its true count). The fairseq shell counts them only for a
      router whose :meth:`Router.needs_token_counts` says so (the balanced hash).
    * ``"dict.txt"``: fairseq's dictionary counts (the fallback, and what every other router
      gets). dict.txt keeps no counts for the special symbols (``<s>``, ``<pad>``,
      ``</s>``, ``<unk>`` load with count 1) although ``</s>`` ends every line and ``<unk>``
      stands for every rare word.
    """

    size: int
    pad: int
    eos: int
    counts_V: Optional[torch.Tensor] = None
    counts_source: str = "dict.txt"


@dataclasses.dataclass
class RouterOutput:
    """The named result of every router.

    expert_ids_TK: LongTensor (T, K); ``DROPPED`` (-1) marks a slot that sends nothing.
    weights_TK:    combine weights (T, K), 0 where the slot is dropped.
    aux_losses:    unweighted differentiable scalars by name (``balance``, ``z``, ...);
                   the criterion weights them.
    stats:         detached tensors for logging; ``tokens_per_expert`` (E,) is always
                   present and counts the routed (kept) slots of non-padding tokens.
    plain_topk_ids_TK: only from a router that reports cross-device traffic
                   (:attr:`Router.simulated_devices`): the ids plain top-K routing of the
                   same probabilities would choose (padding ``DROPPED``, no gradient), which
                   the dispatcher's traffic statistics compare against (``topk_xdev_frac``).
    """

    expert_ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    aux_losses: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    stats: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    plain_topk_ids_TK: Optional[torch.Tensor] = None


class Router(nn.Module):
    """Base class. Subclasses implement :meth:`forward` and set ``top_k``.

    Construction takes the layer's :class:`moe_plugin.config.MoEConfig`, the model
    dimension, and (keyword-only) the :class:`VocabInfo` and the 0-based decoder layer
    index (None outside a decoder), so a router can read its own options
    (``cfg.hash_type``, ...) and seed per-layer state.
    """

    name: str = "?"
    #: whether the router needs :class:`TokenInfo` (hash routing does).
    needs_tokens: bool = False
    #: a router whose cross-device traffic is logged (SAM): the number of devices the local
    #: dispatcher simulates (the expert-parallel one reports the real sends); None: not logged.
    #: ``moe_plugin/dispatch/placement.py`` ``traffic_stats``.
    simulated_devices: Optional[int] = None
    #: the arch declared by :func:`register_router` (None: no arch), its defaults and demo flags
    arch_name: Optional[str] = None
    arch_defaults: Dict[str, object] = {}
    arch_demo_args: List[str] = []
    #: the expert bank this router's output needs (``moe_plugin.experts.EXPERT_VARIANTS``):
    #: "ffn" (every kept slot runs one whole expert FFN) or "segmented" (MultiHash: column i
    #: of ``expert_ids_TK`` picks the expert of segment i of ``expert_segments``).
    expert_variant: str = "ffn"
    expert_segments: int = 1
    #: ``LN(x + experts(x))`` with one LayerNorm shared by the layer's experts (``moe_layer``).
    expert_norm: bool = False
    #: a router whose routing of a token reads the tokens after it (expert choice: each expert
    #: picks its top tokens of the whole batch): its causal-LM perplexity is not a causal LM's,
    #: and the tools that compare perplexities (``make demo``) leave it out
    evaluation_sees_future: bool = False

    def __init__(self, cfg, model_dim: int, *, vocab: Optional[VocabInfo] = None, layer_index: Optional[int] = None):
        super().__init__()
        self.vocab = vocab
        self.layer_index = layer_index
        self.num_experts = cfg.moe_expert_count
        self.model_dim = model_dim
        self.top_k = 1

    def forward(self, x_TD: torch.Tensor, *, tokens: Optional[TokenInfo] = None) -> RouterOutput:
        raise NotImplementedError

    def causal_refusal(self) -> Optional[str]:
        """Why this router, as configured, cannot decode token by token: one line naming the
        option and what is allowed, or None. The MoE layer raises it at the first incremental
        step (generation), since such a mode reads tokens after the one being routed and a
        step would route differently from the full forward over the same text."""
        return None

    def materialize(self) -> None:
        """Fill state this router reads lazily (a table file) before its model is saved; the
        model's layout entry calls it before it records checksums. Default: nothing."""

    @staticmethod
    def validate(cfg) -> None:
        """Raise ValueError for options this router cannot honour (called at build time)."""

    @classmethod
    def balance_scope_supported(cls, cfg) -> bool:
        """Whether ``--moe-balance-scope global`` changes this router's balance loss (the
        softmax skeleton's Switch loss: ``moe_plugin/routing/_softmax.py``); where it would
        not, the option is refused at build time."""
        return False

    @staticmethod
    def needs_token_counts(cfg) -> bool:
        """Whether building this router with ``cfg`` needs the training split's token counts
        (:class:`VocabInfo` ``counts_source="train split"``); the shell reads the corpus only
        when some router says so."""
        return False

    # -- activation checkpointing (moe_plugin.moe_layer.RoutingTape) -----------------------
    def recompute_state(self, route: "RouterOutput"):
        """What a recompute of this forward needs in order to route exactly alike.

        None (the default) for a router that is a function of its input, the token ids and
        the RNG state, all of which the recompute sees again; a router with state that a
        forward changes (BASE's warm-start prices) returns what it decided.
        """
        return None

    @contextlib.contextmanager
    def replaying(self, state):
        """While inside, route as the forward that returned ``state`` did (and change no state)."""
        yield


ROUTER_REGISTRY: Dict[str, Type[Router]] = {}
#: router name -> its option dataclass (fields become --flags of the MoE archs)
ROUTER_OPTIONS: Dict[str, type] = {}
#: called with the router class after every registration (the fairseq shell listens, so that
#: a router registered after the shell was loaded still gets its arch: moe_plugin/models/archs.py)
_REGISTRATION_LISTENERS: List[Callable[[Type[Router]], None]] = []


def on_register(listener: Callable[[Type[Router]], None]) -> None:
    """Call ``listener(cls)`` for every router registered from now on."""
    _REGISTRATION_LISTENERS.append(listener)


def register_router(
    name: str,
    *,
    options: Optional[type] = None,
    arch: Optional[str] = None,
    arch_defaults: Optional[Dict[str, object]] = None,
    demo_args: Optional[List[str]] = None,
) -> Callable[[Type[Router]], Type[Router]]:
    """Class decorator: register a router, its option dataclass and the name of its arch.

    Works from any module, inside the package or outside it (a researcher's ``--user-dir``):
    the router joins :data:`ROUTER_REGISTRY`, its options join the config
    (:func:`moe_plugin.config.moe_config_class`) and the shell builds its arch.

    The arch is declared here as plain data, kept on the class (``arch_name``,
    ``arch_defaults``, ``arch_demo_args``); the fairseq shell turns it into a fairseq arch
    (moe_plugin/models/archs.py). ``arch_defaults`` are the arch's defaults for MoE options (a
    user's flag wins; a callable is computed from the config); ``demo_args`` are extra
    fairseq-train flags ``make demo`` passes for the arch (the demo trains every registered
    arch, so a new router joins it by registering); the demo replaces ``{max_update}`` in them
    by its number of updates.
    """

    def wrap(cls: Type[Router]) -> Type[Router]:
        if name in ROUTER_REGISTRY:
            raise ValueError(f"router {name!r} is registered twice")
        if options is not None and not dataclasses.is_dataclass(options):
            raise ValueError(f"register_router({name!r}): options={options!r} is not a dataclass")
        cls.name = name
        cls.arch_name = arch
        cls.arch_defaults = dict(arch_defaults or {})
        cls.arch_demo_args = list(demo_args or [])
        ROUTER_REGISTRY[name] = cls
        if options is not None:
            ROUTER_OPTIONS[name] = options
        for listener in list(_REGISTRATION_LISTENERS):
            listener(cls)
        return cls

    return wrap


def build_router(cfg, model_dim: int, *, vocab: Optional[VocabInfo] = None, layer_index: Optional[int] = None) -> Router:
    """The router named by ``cfg.moe_router`` (options validated by ``config.validate``)."""
    return ROUTER_REGISTRY[cfg.moe_router](cfg, model_dim, vocab=vocab, layer_index=layer_index)


# ----------------------------------------------------------------------------------------
# Capacity helpers shared by the routers (the aux losses are in moe_plugin/losses.py).
# ----------------------------------------------------------------------------------------


def capacity(num_tokens, num_experts: int, top_k: int, factor: float):
    """Slots per expert: ``ceil(factor * K * T / E)``; ``factor = inf`` means no limit.

    factor 1.0 is a perfectly balanced load (GShard's top-2 capacity 2T/E is factor 1.0).
    ``num_tokens`` may be a 0-dim tensor (the count of non-padding tokens): the capacity is
    then a tensor too, equal to the int formula (same float64 operations), and nothing is
    read back from the device.
    """
    if isinstance(num_tokens, torch.Tensor):
        n = num_tokens.to(torch.float64)
        cap = n * top_k if math.isinf(factor) else torch.ceil(n * (factor * top_k) / num_experts)
        return cap.clamp(min=1).long()
    if math.isinf(factor):
        return max(num_tokens * top_k, 1)
    return max(int(math.ceil(factor * top_k * num_tokens / num_experts)), 1)


def per_slot_capacity(num_tokens, num_experts: int, top_k: int, factor: float):
    """Slots per expert ``K * ceil(factor * T / E)`` (Hetu's SAM gate: ``k * ceil((T / E) *
    capacity_factor)``; SAM's ``--sam-capacity-rounding per_slot``).

    Like :func:`capacity`, ``num_tokens`` may be a 0-dim tensor (no host sync; the result is
    then a tensor equal to the int formula); ``factor = inf`` means no limit (K * T).
    """
    if isinstance(num_tokens, torch.Tensor):
        n = num_tokens.to(torch.float64)
        per_slot = n if math.isinf(factor) else torch.ceil(n / num_experts * factor)
        return (per_slot.clamp(min=1) * top_k).long()
    if math.isinf(factor):
        return max(num_tokens, 1) * top_k
    return max(int(math.ceil(num_tokens / num_experts * factor)), 1) * top_k


def apply_capacity(expert_ids_TK: torch.Tensor, num_experts: int, cap) -> torch.Tensor:
    """Drop slots beyond ``cap`` per expert; first choices of all tokens go first, then
    second choices, each in token order (GShard's priority). Returns ids with ``DROPPED``.

    Already-dropped slots (-1) stay dropped and take no capacity.
    """
    T, K = expert_ids_TK.shape
    ids_KT = expert_ids_TK.t()  # priority order: slot k of every token before slot k+1
    kept_KT = ids_KT >= 0
    onehot_KTE = torch.nn.functional.one_hot(ids_KT.clamp(min=0), num_experts) * kept_KT.unsqueeze(-1)
    # position of each slot in its expert's queue (0-based)
    rank_KTE = onehot_KTE.reshape(K * T, num_experts).cumsum(0).reshape(K, T, num_experts) - 1
    rank_KT = (rank_KTE * onehot_KTE).sum(-1)
    keep_KT = kept_KT & (rank_KT < cap)
    return torch.where(keep_KT, ids_KT, torch.full_like(ids_KT, DROPPED)).t().contiguous()


def limit_capacity(expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, cap):
    """The capacity limit and its bookkeeping, shared by the softmax routers: drop slots past
    ``cap`` per expert (``cap=None``: no limit), zero the dropped slots' weights.
    -> (routed ids, weights, stats with ``tokens_per_expert`` and ``dropped_frac``)."""
    routed_TK = expert_ids_TK if cap is None else apply_capacity(expert_ids_TK, num_experts, cap)
    weights_TK = weights_TK * (routed_TK >= 0).to(weights_TK.dtype)
    want = (expert_ids_TK >= 0).sum()
    got = (routed_TK >= 0).sum()
    stats = {
        "tokens_per_expert": tokens_per_expert(routed_TK, num_experts),
        "dropped_frac": ((want - got).float() / want.clamp(min=1).float()).detach(),
    }
    return routed_TK, weights_TK, stats


def tokens_per_expert(expert_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) counts of kept slots (ids -1 are not counted), without a host sync."""
    ids = expert_ids_TK.reshape(-1)
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=ids.device)
    return counts_E.scatter_add_(0, ids.clamp(min=0), (ids >= 0).long())
