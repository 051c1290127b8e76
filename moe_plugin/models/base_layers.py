"""BASE layers in the fairseq shell: how many, where they go, and fairseq's per-rank switch.

Two explicit fields say what a config means:

* ``moe_base_layers``: the number of BASE layers inserted into the decoder
  (moe_plugin/base_layer.py). On the command line fairseq's own ``--base-layers N`` keeps
  its meaning and fills it (``--moe-base-layers N`` says the same); unset in a hydra config
  or a checkpoint's cfg: read from ``base_layers`` (below), the way older configs were;
* ``moe_expert_parallel``: E/W experts per rank (moe_plugin/models/expert_parallel.py).

``base_layers`` is what fairseq itself reads: ``cfg.model.base_layers > 0`` in
``distributed_init`` (``-rank-R`` appended to every checkpoint name), in
``Trainer.should_save_checkpoint_on_current_rank`` (save on every rank) and in
``Trainer.load_checkpoint`` (each rank loads its own file). Every rank-0-only path would
lose the experts of ranks 1..W-1, so expert-parallel mode needs it > 0 even without BASE
layers. It is derived in one function, :func:`fairseq_base_layers` ``= moe_base_layers +
moe_expert_parallel``: by the arch function from the command line (before fairseq converts
it to its config) and, in a hydra config that leaves it out, by the model dataclass's
default (an OmegaConf interpolation, resolved when fairseq's ``distributed_init`` first
reads it, before the model is built). Checkpoints written before ``moe_base_layers``
existed hold ``base_layers = N + 1`` with ``moe_expert_parallel`` (and N without), which is
the same rule read backwards (:func:`base_layer_count`).

fairseq's decoder would insert its own ``BaseLayer`` for ``base_layers > 0``; the MoE
decoder builds its output projection with a copy of the config whose ``base_layers`` is 0
and inserts the plugin's BASE layers itself (:func:`insert_base_layers`).
"""

from __future__ import annotations

import copy

from moe_plugin.base_layer import BaseLayer

#: OmegaConf resolver of the model dataclass's ``base_layers`` default (registered by
#: moe_plugin/models/archs.py, which knows the arch defaults)
RESOLVER = "moe_fairseq_base_layers"
#: the interpolation: the arch (``_name``), the explicit count and expert parallelism
BASE_LAYERS_DEFAULT = f"${{{RESOLVER}:${{._name}},${{.moe_base_layers}},${{.moe_expert_parallel}}}}"


def fairseq_base_layers(count: int, expert_parallel) -> int:
    """The ``base_layers`` value fairseq reads: the BASE-layer count, plus one in
    expert-parallel mode (fairseq's per-rank checkpoints; see the module docstring)."""
    return int(count) + int(bool(expert_parallel))


def _get(cfg, name, default=None):
    value = getattr(cfg, name, None)
    return default if value is None else value


def base_layer_count(cfg) -> int:
    """The number of BASE layers ``cfg`` (a model config: DictConfig, Namespace after the
    arch function, TransformerConfig-like) asks for; ValueError if its fields disagree."""
    explicit = getattr(cfg, "moe_base_layers", None)
    switch = int(_get(cfg, "base_layers", 0))
    expert_parallel = bool(getattr(cfg, "moe_expert_parallel", False))
    if explicit is None:  # a config or checkpoint that gives only fairseq's field
        count = switch - 1 if expert_parallel and switch > 0 else switch
    else:
        count = int(explicit)
        if switch != fairseq_base_layers(count, expert_parallel):
            raise ValueError(
                f"--base-layers: {switch} is not allowed with --moe-base-layers {count} and "
                f"--moe-expert-parallel {expert_parallel}; allowed: {fairseq_base_layers(count, expert_parallel)} "
                "(base_layers is derived from them: leave it out of a hydra config)"
            )
    if count < 0:
        raise ValueError(f"--base-layers: {count} is not allowed; allowed: >= 0")
    return count


def derive_from_command_line(args) -> None:
    """The command line's Namespace (called once by every moe_lm arch function): fairseq's
    ``--base-layers N`` (or ``--moe-base-layers N``) is the BASE-layer count; set
    ``moe_base_layers`` to it and ``base_layers`` to :func:`fairseq_base_layers`.

    Idempotent: a Namespace already derived (``base_layers`` equal to the derived value) is
    left as it is."""
    given = getattr(args, "base_layers", None)
    count = getattr(args, "moe_base_layers", None)
    expert_parallel = bool(getattr(args, "moe_expert_parallel", False))
    if count is None:
        count = int(given or 0)
    elif given is not None and int(given) not in (int(count), fairseq_base_layers(count, expert_parallel)):
        raise ValueError(
            f"--base-layers: {given} is not allowed with --moe-base-layers {count}; allowed: the same "
            "number, or leave one of them out (both are the number of BASE layers)"
        )
    if int(count) < 0:
        raise ValueError(f"--base-layers: {count} is not allowed; allowed: >= 0")
    args.moe_base_layers = int(count)
    args.base_layers = fairseq_base_layers(count, expert_parallel)


def without_fairseq_base_layers(cfg):
    """A shallow copy of ``cfg`` with ``base_layers = 0``: what fairseq's
    ``build_output_projection`` is given, so that it inserts none of its own BaseLayers."""
    cfg = copy.copy(cfg)
    cfg.base_layers = 0
    return cfg


def insert_base_layers(decoder, cfg, num: int) -> None:
    """Insert ``num`` BASE layers into ``decoder.layers`` at fairseq's positions.

    ``decoder`` is a :class:`moe_plugin.models.moe_lm.MoETransformerDecoder` (its
    ``moe_cfg``, ``token_context``, ``vocab_info``, ``embed_dim``); ``cfg`` its fairseq
    config (TransformerConfig or the flat Namespace) for the BASE-layer options.
    """
    if num < 0:
        raise ValueError(f"--base-layers: {num} is not allowed; allowed: >= 0")
    if num == 0:
        return
    sublayers = int(_get(cfg, "base_sublayers", 1))
    ffn_dim = decoder.moe_cfg.moe_expert_ffn_dim or int(_get(cfg, "decoder_ffn_embed_dim"))
    activation = str(_get(cfg, "activation_fn", "relu"))
    shuffle = bool(_get(cfg, "base_shuffle", False))
    num_layers = len(decoder.layers)
    # each BASE layer is built knowing its final index in the stack, so its experts' seed is
    # (--seed, layer index) like every MoE layer's (moe_plugin/moe_layer.py layer_seed)
    final = base_layer_positions(num_layers, num)
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
            layer_index=final[i],
        )
        layer.checkpoint_activations = bool(_get(cfg, "checkpoint_activations", False))
        layer.offload_activations = bool(_get(cfg, "offload_activations", False))
        decoder.layers.insert(((i + 1) * num_layers) // (num + 1), layer)
    assert [i for i, m in enumerate(decoder.layers) if isinstance(m, BaseLayer)] == final


def base_layer_positions(num_layers: int, num_base: int):
    """Final indices of the BASE layers in the decoder stack (fairseq's insertion rule)."""
    layers = ["x"] * num_layers
    for i in range(num_base):
        layers.insert(((i + 1) * num_layers) // (num_base + 1), "base")
    return [i for i, kind in enumerate(layers) if kind == "base"]
