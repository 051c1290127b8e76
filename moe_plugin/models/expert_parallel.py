"""How expert-parallel mode plugs into fairseq-train (through its own switches, no patching).

fairseq 0.12 has exactly one switch for models whose parameters differ between
data-parallel ranks, the one its BASE layers use: ``cfg.model.base_layers > 0``. With it
fairseq

* appends ``-rank-R`` to every checkpoint name (``distributed_init``),
* saves a checkpoint on every rank, not only on rank 0 (``Trainer.should_save_checkpoint_on_current_rank``),
* loads each rank's own file instead of broadcasting rank 0's (``Trainer.load_checkpoint``).

Every other rank-0-only path would lose the experts of ranks 1..W-1. So in expert-parallel
mode the arch function adds 1 to ``base_layers`` when it parses the command line
(:func:`prepare_args`), and ``MoELanguageModel.build_model`` hides that 1 from the decoder
while it builds it (:func:`decoder_base_layers`): fairseq's own ``--base-layers N`` keeps
its meaning (N extra BASE layers), and the checkpoint's cfg records N + 1 with
``moe_expert_parallel = True``, which every later build reads the same way.

The arch function also refuses what cannot work: a DDP backend that all-reduces every
gradient (expert gradients must stay on their rank), an expert count not divisible by
the world size, optimizer-state sharding and BMUF (both assume identical parameters on
every rank), and fairseq's flattened fp16/bf16 optimizer (its single flat fp32 buffer
drops ``param.expert``; ``--fp16-no-flatten-grads`` or the memory-efficient variants keep it).
"""

from __future__ import annotations

import argparse
import contextlib

from moe_plugin.dispatch.all_to_all import world_size

#: fairseq --ddp-backend values whose gradient reduction skips ``param.expert``
EXPERT_AWARE_DDP = ("legacy_ddp", "no_c10d")


def prepare_args(args) -> None:
    """Validate expert-parallel options and add fairseq's per-rank checkpoint switch.

    Called by every moe_lm arch function. Acts only on the command line's Namespace
    (the arch function runs again on the DictConfig when the model is built, and on the
    saved cfg of a checkpoint, where the switch is already counted).
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
    args.base_layers = int(getattr(args, "base_layers", 0) or 0) + 1


@contextlib.contextmanager
def decoder_base_layers(cfg):
    """While building the decoder, ``cfg.base_layers`` is the user's own count."""
    expert_parallel = bool(getattr(cfg, "moe_expert_parallel", False))
    marked = expert_parallel and int(getattr(cfg, "base_layers", 0) or 0) > 0
    if expert_parallel and not marked and world_size() > 1:
        raise ValueError(
            "--moe-expert-parallel: fairseq would save only rank 0's experts; its per-rank "
            "checkpoints need base_layers > 0, which fairseq-train's command line adds by itself "
            "(a hydra config must set model.base_layers: 1, counted as 0 extra BASE layers)"
        )
    if not marked:
        yield
        return
    cfg.base_layers = int(cfg.base_layers) - 1
    try:
        yield
    finally:
        cfg.base_layers = int(cfg.base_layers) + 1
