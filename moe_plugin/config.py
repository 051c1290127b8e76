"""MoE configuration: one dataclass for the core, and the one adapter from fairseq's cfg.

The core (routers, experts, dispatch, the MoE layer) reads only :class:`MoEConfig`. Each
router may declare its own option dataclass (``register_router(..., options=...)``); the
full config is the core options plus every registered router's, so a new router brings
its command-line options with it. fairseq sees the same fields through the model's
config dataclass (``moe_plugin/models``), so every field is also a ``--flag``.
"""


import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from moe_plugin.routing import ROUTER_REGISTRY, ROUTER_OPTIONS


@dataclass
class MoECoreOptions:
    moe_router: str = field(
        default="switch", metadata={"help": "routing scheme of the MoE layers (set by --arch)"}
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


def _combined_config_class():
    bases = tuple(ROUTER_OPTIONS[name] for name in sorted(ROUTER_OPTIONS)) + (MoECoreOptions,)
    return dataclasses.make_dataclass("MoEConfig", [], bases=bases)


#: the dense baseline arch: moe_lm without MoE layers, with the MoE archs' defaults
#: (registered by moe_plugin/models/moe_lm.py; compare MoE archs against it, not transformer_lm)
DENSE_ARCH = "dense_lm"

MoEConfig = _combined_config_class()
MoEConfig.__doc__ = "Core MoE options plus every registered router's options."
MOE_FIELDS = tuple(f.name for f in dataclasses.fields(MoEConfig))


def from_fairseq(args: Any):
    """The one adapter: fairseq's Namespace / DictConfig -> MoEConfig (missing -> defaults)."""
    kwargs = {}
    for f in dataclasses.fields(MoEConfig):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            if value is not None or f.default is None:
                kwargs[f.name] = value
    return MoEConfig(**kwargs)


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
    if cfg.moe_router not in ROUTER_REGISTRY:
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
    if num_layers is not None:
        parse_moe_layers(cfg, num_layers)
    ROUTER_REGISTRY[cfg.moe_router].validate(cfg)
