"""How expert-parallel mode plugs into fairseq-train (through its own switches, no patching).

fairseq 0.12 has exactly one switch for models whose parameters differ between
data-parallel ranks, the one its BASE layers use: ``cfg.model.base_layers > 0``. With it
fairseq

* appends ``-rank-R`` to every checkpoint name (``distributed_init``),
* saves a checkpoint on every rank, not only on rank 0 (``Trainer.should_save_checkpoint_on_current_rank``),
* loads each rank's own file instead of broadcasting rank 0's (``Trainer.load_checkpoint``).

Every other rank-0-only path would lose the experts of ranks 1..W-1. The value fairseq
reads is derived from the explicit fields ``moe_base_layers`` and ``moe_expert_parallel``
in one place, moe_plugin/models/base_layers.py (``moe_base_layers + 1`` in expert-parallel
mode), on the command line and in a hydra config alike; :func:`check_rank_checkpoints`
refuses a config that would still turn the switch off.

The arch function also refuses what cannot work: a DDP backend that all-reduces every
gradient (expert gradients must stay on their rank), an expert count not divisible by
the world size, optimizer-state sharding and BMUF (both assume identical parameters on
every rank), and fairseq's flattened fp16/bf16 optimizer (its single flat fp32 buffer
drops ``param.expert``; ``--fp16-no-flatten-grads`` or the memory-efficient variants keep it).
"""

from __future__ import annotations

import argparse

from moe_plugin.dispatch.all_to_all import world_size

#: fairseq --ddp-backend values whose gradient reduction skips ``param.expert``
EXPERT_AWARE_DDP = ("legacy_ddp", "no_c10d")


def prepare_args(args) -> None:
    """Validate expert-parallel options against the rest of the command line.

    Called by every moe_lm arch function. Acts only on the command line's Namespace, which
    holds fairseq's distributed and optimizer options (the arch function runs again on the
    model's DictConfig when the model is built, and on the saved cfg of a checkpoint).
    """
    if not getattr(args, "moe_expert_parallel", False) or not isinstance(args, argparse.Namespace):
        return
    world = int(getattr(args, "distributed_world_size", 1) or 1)
    backend = getattr(args, "ddp_backend", None)
    if world > 1 and backend not in EXPERT_AWARE_DDP:
        raise ValueError(
            f"--ddp-backend: {backend!r} is not allowed with --moe-expert-parallel; allowed: "
            f"{', '.join(EXPERT_AWARE_DDP)} (the other backends all-reduce expert gradients, "
            "which must stay on the rank that holds the expert)"
        )
    E = int(getattr(args, "moe_expert_count", 0) or 0)
    if world > 1 and E % world:
        raise ValueError(
            f"--moe-expert-count: {E} is not allowed with --moe-expert-parallel on "
            f"--distributed-world-size {world}; allowed: a multiple of {world} (each worker holds E/W experts)"
        )
    if world > 1 and getattr(args, "zero_sharding", "none") not in (None, "none"):
        raise ValueError(
            f"--zero-sharding: {args.zero_sharding!r} is not allowed with --moe-expert-parallel; allowed: none "
            "(it shards optimizer state on the assumption that every rank holds the same parameters)"
        )
    if world > 1 and getattr(args, "use_bmuf", False):
        raise ValueError(
            "--use-bmuf: not allowed with --moe-expert-parallel (BMUF averages every parameter over the "
            "ranks, expert parameters included, although each rank holds different experts)"
        )
    half = getattr(args, "fp16", False) or getattr(args, "bf16", False)
    memory_efficient = getattr(args, "memory_efficient_fp16", False) or getattr(args, "memory_efficient_bf16", False)
    if world > 1 and half and not memory_efficient and not getattr(args, "fp16_no_flatten_grads", False):
        raise ValueError(
            "--fp16/--bf16: not allowed with --moe-expert-parallel as is; add --fp16-no-flatten-grads "
            "or use --memory-efficient-fp16/--memory-efficient-bf16 (fairseq's flattened fp32 copy of the "
            "parameters loses param.expert, so expert gradients would enter the gradient norm and the "
            "ranks' norms would disagree)"
        )


def check_rank_checkpoints(cfg) -> None:
    """At build time: expert parallelism on W > 1 ranks needs fairseq's per-rank checkpoints
    (``base_layers > 0``, derived in moe_plugin/models/base_layers.py); a config that sets
    ``base_layers: 0`` explicitly would save only rank 0's experts."""
    if bool(getattr(cfg, "moe_expert_parallel", False)) and world_size() > 1:
        if not int(getattr(cfg, "base_layers", 0) or 0) > 0:
            raise ValueError(
                f"--base-layers: {getattr(cfg, 'base_layers', None)!r} is not allowed with --moe-expert-parallel "
                f"on {world_size()} workers; fairseq would save only rank 0's experts; allowed: leave it out "
                "(it is derived from moe_base_layers and moe_expert_parallel), or moe_base_layers + 1"
            )
