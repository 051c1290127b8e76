"""MoE configuration: one dataclass for the core, and the one adapter from fairseq's cfg.

The core (routers, experts, dispatch, the MoE layer) reads only ``MoEConfig``. Each
router may declare its own option dataclass (``register_router(..., options=...)``); the
full config is the core options plus every registered router's, so a new router brings
its command-line options with it. The class is built from the registry when it is asked
for (:func:`moe_config_class`; ``moe_plugin.config.MoEConfig`` is the same, current class),
so a router registered after import, from outside the package, joins it. fairseq sees the
same fields through the model's config dataclass (``moe_plugin/models``), so every field
is also a ``--flag``.
"""


import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from moe_plugin.routing import ROUTER_REGISTRY, ROUTER_OPTIONS


@dataclass
class MoECoreOptions:
    moe_router: Optional[str] = field(
        default=None,
        metadata={"help": "routing scheme of the MoE layers; set by --arch (every arch names its router), "
                  "required with --arch moe_lm / model._name: moe_lm"},
    )
    moe_expert_count: int = field(default=8, metadata={"help": "experts per MoE layer"})
    moe_top_k: int = field(default=1, metadata={"help": "experts activated per token"})
    moe_freq: int = field(
        default=2,
        metadata={
            "help": "replace the FFN of every N-th decoder layer (0-based layers N-1, 2N-1, ...) "
            "by an MoE layer (Switch/GShard: every 2nd); 0 = none; ignored if --moe-layers is given"
        },
    )
    moe_layers: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated 0-based decoder layer indices with an MoE FFN, e.g. 1,3 (overrides --moe-freq)"},
    )
    moe_expert_ffn_dim: int = field(
        default=0, metadata={"help": "hidden dim of each expert FFN; 0 = --decoder-ffn-embed-dim"}
    )
    moe_shared_experts: int = field(
        default=0,
        metadata={
            "help": "shared experts per MoE layer (DeepSeekMoE, Dai et al. 2024): N always-active expert FFNs "
            "beside the routed ones, run on every non-padding token, their outputs added (weight 1) to the "
            "routed experts' combined output; replicated on every worker; 0 = none"
        },
    )
    moe_shared_expert_ffn_dim: int = field(
        default=0,
        metadata={
            "help": "hidden dim of each shared expert FFN; 0 = the routed experts' (--moe-expert-ffn-dim, "
            "else --decoder-ffn-embed-dim)"
        },
    )
    moe_capacity_factor: float = field(
        default=1.25,
        metadata={
            "help": "training capacity per expert = ceil(factor * K * T / E); tokens over it "
            "are dropped and pass through the residual; 'inf' = never drop"
        },
    )
    moe_eval_capacity_factor: float = field(
        default=math.inf,
        metadata={
            "help": "capacity factor in evaluation; default 'inf' = never drop, so a token's output "
            "does not depend on the other tokens of its batch (a finite factor makes fairseq-eval-lm's "
            "perplexity depend on --max-tokens and on which sequences share a batch)"
        },
    )
    moe_no_gating_fp32: bool = field(
        default=False,
        metadata={
            "help": "compute router logits and softmax in the model's dtype (fp16/bf16) instead of "
            "fp32 (default: fp32, Switch's selective precision)"
        },
    )
    moe_seed: Optional[int] = field(
        default=None,
        metadata={
            "help": "seed of the routers' random state (hash tables, frozen routers) when their own "
            "seed option is unset; fairseq's model config fills it from --seed"
        },
    )
    moe_expert_parallel: bool = field(
        default=False,
        metadata={
            "help": "expert parallelism: each of W workers holds E/W experts, tokens travel by "
            "all-to-all (needs --ddp-backend legacy_ddp); default: every worker holds all experts"
        },
    )


def _gating_use_fp32(cfg) -> bool:
    """Router logits and softmax in fp32 (every router reads this; ``--moe-no-gating-fp32`` turns it off).

    A negative flag on purpose: fairseq turns a boolean option whose default is True into a
    ``store_false`` flag, so a ``--moe-gating-use-fp32`` defaulting to on would switch fp32
    routing *off* when passed (the meaning of fairseq's moe-branch flag of that name is the
    opposite).
    """
    return not cfg.moe_no_gating_fp32


MoECoreOptions.moe_gating_use_fp32 = property(_gating_use_fp32)


_CONFIG_CLASSES: dict = {}


def moe_config_class() -> type:
    """``MoEConfig``: the core options plus the options of every router registered so far.

    Rebuilt (once) when a router with options registers after the last call, so a router
    from outside the package (``register_router`` in a ``--user-dir``) joins it."""
    key = tuple((name, ROUTER_OPTIONS[name]) for name in sorted(ROUTER_OPTIONS))
    cls = _CONFIG_CLASSES.get(key)
    if cls is None:
        bases = tuple(options for _, options in key) + (MoECoreOptions,)
        cls = dataclasses.make_dataclass("MoEConfig", [], bases=bases)
        cls.__doc__ = "Core MoE options plus every registered router's options."
        cls.__module__ = __name__
        _CONFIG_CLASSES[key] = cls
    return cls


def __getattr__(name: str):
    # ``MoEConfig`` / ``MOE_FIELDS`` are always the current class and its field names
    if name == "MoEConfig":
        return moe_config_class()
    if name == "MOE_FIELDS":
        return tuple(f.name for f in dataclasses.fields(moe_config_class()))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def from_fairseq(args: Any):
    """The one adapter: fairseq's Namespace / DictConfig -> MoEConfig (missing -> defaults)."""
    cls = moe_config_class()
    kwargs = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            if value is not None or f.default is None:
                kwargs[f.name] = value
    return cls(**kwargs)


def parse_moe_layers(cfg, num_layers: int) -> List[int]:
    """Decoder layer indices whose FFN is an MoE layer; ValueError on bad input."""
    if cfg.moe_layers not in (None, ""):
        try:
            layers = sorted({int(s) for s in str(cfg.moe_layers).split(",") if s.strip() != ""})
        except ValueError:
            raise ValueError(
                f"--moe-layers: {cfg.moe_layers!r} is not allowed; it must be comma-separated layer indices, e.g. 1,3"
            ) from None
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"--moe-layers: layer index {bad[0]} is out of range; the decoder has "
                f"{num_layers} layers, so allowed indices are 0..{num_layers - 1}"
            )
        return layers
    if cfg.moe_freq < 0:
        raise ValueError(f"--moe-freq: {cfg.moe_freq} is negative; allowed: 0 (no MoE layer) or N >= 1")
    if cfg.moe_freq == 0:
        return []
    if cfg.moe_freq > num_layers:
        raise ValueError(
            f"--moe-freq: {cfg.moe_freq} is larger than the number of decoder layers "
            f"({num_layers}), so no layer would be an MoE layer; allowed: 1..{num_layers}"
        )
    return [i for i in range(num_layers) if (i + 1) % cfg.moe_freq == 0]


def validate(cfg, num_layers: Optional[int] = None) -> None:
    """Check every core option and the router's own; raise one ValueError naming the option."""
    # no router is needed where nothing is routed (the dense baseline; BASE layers name their own)
    unrouted = cfg.moe_router is None and num_layers is not None and not parse_moe_layers(cfg, num_layers)
    if cfg.moe_router is None and not unrouted:
        raise ValueError(
            "--moe-router: unset; the model moe_lm (--arch moe_lm, hydra model._name: moe_lm) names no "
            f"router; allowed: {', '.join(sorted(ROUTER_REGISTRY))}, or an arch that names its router "
            "(model._name: switch_lm, ...)"
        )
    if cfg.moe_router not in ROUTER_REGISTRY and not unrouted:
        raise ValueError(
            f"--moe-router: unknown router {cfg.moe_router!r}; allowed: {', '.join(sorted(ROUTER_REGISTRY))}"
        )
    if cfg.moe_expert_count < 1:
        raise ValueError(f"--moe-expert-count: {cfg.moe_expert_count} is not allowed; it must be >= 1")
    if cfg.moe_top_k < 1 or cfg.moe_top_k > cfg.moe_expert_count:
        raise ValueError(
            f"--moe-top-k: {cfg.moe_top_k} is not allowed with --moe-expert-count "
            f"{cfg.moe_expert_count}; allowed: 1..{cfg.moe_expert_count}"
        )
    for name in ("moe_capacity_factor", "moe_eval_capacity_factor"):
        v = getattr(cfg, name)
        if not (v > 0) or math.isnan(v):
            raise ValueError(f"--{name.replace('_', '-')}: {v} is not allowed; it must be > 0 (or inf)")
    if cfg.moe_expert_ffn_dim < 0:
        raise ValueError(f"--moe-expert-ffn-dim: {cfg.moe_expert_ffn_dim} is not allowed; it must be >= 0")
    shared = getattr(cfg, "moe_shared_experts", 0)
    if shared < 0:
        raise ValueError(f"--moe-shared-experts: {shared} is not allowed; it must be >= 0 (0 = no shared expert)")
    shared_dim = getattr(cfg, "moe_shared_expert_ffn_dim", 0)
    if shared_dim < 0:
        raise ValueError(
            f"--moe-shared-expert-ffn-dim: {shared_dim} is not allowed; it must be >= 0 (0 = the routed experts' dim)"
        )
    if shared_dim > 0 and shared == 0:
        raise ValueError(
            f"--moe-shared-expert-ffn-dim: {shared_dim} has no effect with --moe-shared-experts 0; allowed: 0, "
            "or give --moe-shared-experts N >= 1"
        )
    if num_layers is not None:
        moe_layers = parse_moe_layers(cfg, num_layers)
        if shared > 0 and not moe_layers:
            raise ValueError(
                f"--moe-shared-experts: {shared} has no effect, no decoder layer has an MoE FFN "
                "(--moe-freq 0 and no --moe-layers); allowed: 0, or MoE layers (--moe-freq / --moe-layers)"
            )
    if not unrouted:
        ROUTER_REGISTRY[cfg.moe_router].validate(cfg)
        _validate_balance_scope(cfg)


def _validate_balance_scope(cfg) -> None:
    """``--moe-balance-scope``: a value of the list, and ``global`` only where it changes a loss."""
    scope = getattr(cfg, "moe_balance_scope", "micro")
    from moe_plugin.routing._softmax import BALANCE_SCOPES

    if scope not in BALANCE_SCOPES:
        raise ValueError(f"--moe-balance-scope: {scope!r} is not allowed; allowed: {', '.join(BALANCE_SCOPES)}")
    router = ROUTER_REGISTRY[cfg.moe_router]
    if scope != "micro" and not router.balance_scope_supported(cfg):
        allowed = sorted(n for n, r in ROUTER_REGISTRY.items() if r.balance_scope_supported(cfg))
        raise ValueError(
            f"--moe-balance-scope: {scope!r} is not allowed for the {cfg.moe_router} router, whose losses are not "
            f"Switch's balance loss over first choices (it would change nothing, or SAM's group/expert losses, "
            f"which have no global form here); allowed: micro, or global with the routers {', '.join(allowed)} "
            "(hyper with --hyper-balance-loss)"
        )
