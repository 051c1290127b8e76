"""The fairseq shell: a Transformer LM whose chosen decoder layers have an MoE FFN.

``moe_lm`` subclasses fairseq's ``TransformerLanguageModel``; its decoder subclasses
fairseq's ``TransformerDecoder`` and extends it only through fairseq's hooks:

* ``build_decoder_layer`` builds :class:`MoEDecoderLayer` for the MoE layer indices;
* :class:`MoEDecoderLayer` subclasses ``TransformerDecoderLayerBase`` and uses its
  ``build_fc1``/``build_fc2`` hooks: ``fc1`` is the whole MoE FFN (router, experts with
  their own activation and activation dropout, combine) and ``fc2`` and the layer's
  activation are identities, so fairseq's own forward (attention, incremental state,
  residual, LayerNorm, dropout) runs unchanged around it;
* ``extract_features`` records the token ids of the forward in a :class:`TokenContext`
  shared with the MoE layers, so routers see ids aligned with the (T x B) hidden states,
  also under incremental decoding.

Every routing scheme registers an arch (``switch_lm``, ``gshard_lm``, ...) from its router
file; they all build this one model.
"""


import argparse
import dataclasses
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from fairseq import options
from omegaconf import II
from fairseq.distributed import fsdp_wrap
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerDecoder
from fairseq.models.transformer_lm import (
    DEFAULT_MAX_TARGET_POSITIONS,
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture as fairseq_base_lm_architecture,
)
from fairseq.modules import AdaptiveInput, CharacterTokenEmbedder
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase

from moe_plugin import config as moe_config
from moe_plugin.moe_layer import MoELayer, build_moe_layer, checkpointed
from moe_plugin.models import checkpoint_layout as ep_layout, expert_parallel as ep_glue
from moe_plugin.models import token_counts
from moe_plugin.routing import ARCHS, ROUTER_REGISTRY, TokenInfo, VocabInfo


MoELanguageModelConfig = dataclasses.make_dataclass(
    "MoELanguageModelConfig",
    # the routers' random state follows fairseq's --seed (common.seed) unless a router's own
    # seed option fixes it; an interpolation, so fairseq-train and hydra configs both fill it
    [("moe_seed", Optional[int], dataclasses.field(default=II("common.seed"))),
     # the split a frequency-balanced router counts its tokens in (moe_plugin/models/token_counts.py)
     ("moe_train_subset", Optional[str], dataclasses.field(default=II("dataset.train_subset")))],
    bases=(moe_config.MoEConfig, TransformerLanguageModelConfig),
)


class TokenContext:
    """Token ids of the decoder's current forward, shared by the decoder and its MoE layers."""

    def __init__(self, pad: int):
        self.pad = pad
        self.current: Optional[TokenInfo] = None

    def set(self, tokens_BT: torch.Tensor, incremental: bool) -> None:
        """Build ids aligned with fairseq's (T x B) layer input, row ``t * B + b``.

        Under incremental decoding fairseq feeds only the last position; the full prefix
        still gives its previous token and its absolute position.
        """
        B, L = tokens_BT.shape
        pad = self.pad
        prev_BT = torch.cat([tokens_BT.new_full((B, 1), pad), tokens_BT[:, :-1]], dim=1)
        next_BT = torch.cat([tokens_BT[:, 1:], tokens_BT.new_full((B, 1), pad)], dim=1)
        pos_BT = torch.arange(L, device=tokens_BT.device).unsqueeze(0).expand(B, L)
        if incremental:
            sl = slice(L - 1, L)
            tokens_BT, prev_BT, pos_BT = tokens_BT[:, sl], prev_BT[:, sl], pos_BT[:, sl]
            next_BT = None

        def flat(t):
            return None if t is None else t.t().reshape(-1)

        self.current = TokenInfo(
            ids_T=flat(tokens_BT),
            prev_ids_T=flat(prev_BT),
            positions_T=flat(pos_BT),
            pad_mask_T=flat(tokens_BT.eq(pad)),
            next_ids_T=flat(next_BT),
            incremental=incremental,
        )

    def get(self) -> Optional[TokenInfo]:
        return self.current


def _identity(x):
    return x


class MoEDecoderLayer(TransformerDecoderLayerBase):
    """A fairseq decoder layer whose FFN (fc1 -> act -> fc2) is one :class:`MoELayer` (``fc1``)."""

    def __init__(self, cfg, no_encoder_attn, moe_cfg, layer_index: int, token_context: TokenContext, vocab: VocabInfo):
        if getattr(cfg, "scale_fc", False):
            raise ValueError("--scale-fc: not supported in MoE layers (the expert FFN has no inner LayerNorm)")
        pq = float(getattr(getattr(cfg, "quant_noise", None), "pq", 0.0) or 0.0)
        if pq > 0:
            raise ValueError(
                f"--quant-noise-pq: {pq} is not allowed with MoE layers; allowed: 0 (fairseq applies "
                "quant-noise to a layer's fc1/fc2, and an MoE FFN's experts have none, so the MoE layers "
                "would silently train without it)"
            )
        # read by build_fc1, which fairseq's __init__ calls (plain attributes may be set
        # before nn.Module.__init__)
        self._moe_build_args = (cfg, moe_cfg, layer_index, vocab)
        super().__init__(cfg, no_encoder_attn)
        del self._moe_build_args
        self.layer_index = layer_index
        self.fc1.token_source = token_context.get
        self.activation_fn = _identity  # the experts apply the activation themselves
        # --checkpoint-activations / --offload-activations: this layer checkpoints itself
        # (moe_layer.checkpointed) instead of taking fairseq's checkpoint_wrapper, whose
        # no_grad first forward would cut the aux losses off from the gradient
        self.checkpoint_activations = bool(getattr(cfg, "checkpoint_activations", False))
        self.offload_activations = bool(getattr(cfg, "offload_activations", False))

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size) -> MoELayer:
        cfg, moe_cfg, layer_index, vocab = self._moe_build_args
        act_dropout = cfg.activation_dropout or getattr(cfg, "relu_dropout", 0.0) or 0.0
        return build_moe_layer(
            moe_cfg,
            input_dim,
            output_dim,
            activation=str(cfg.activation_fn),
            activation_dropout=float(act_dropout),
            vocab=vocab,
            layer_index=layer_index,
        )

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        return nn.Identity()

    def forward(self, x, *args, **kwargs):
        # the experts already applied activation dropout; disable the layer's own
        self.activation_dropout_module.p = 0.0
        incremental = kwargs.get("incremental_state", args[2] if len(args) > 2 else None) is not None
        if self.checkpoint_activations and self.training and torch.is_grad_enabled() and not incremental:
            return checkpointed(super().forward, [self.fc1], x, *args, offload=self.offload_activations, **kwargs)
        return super().forward(x, *args, **kwargs)

    @property
    def moe(self) -> MoELayer:
        return self.fc1


class MoETransformerDecoder(TransformerDecoder):
    def __init__(self, args, dictionary, embed_tokens, no_encoder_attn=True, count_tokens=None):
        """``count_tokens``: a callable returning the training split's token counts (V,) or
        None; called only when the router needs them (``Router.needs_token_counts``)."""
        num_layers = args.decoder_layers
        moe_cfg = moe_config.from_fairseq(args)
        moe_config.validate(moe_cfg, num_layers)
        # set before fairseq's __init__, which calls build_decoder_layer once per layer
        self.moe_cfg = moe_cfg
        self.moe_layer_indices = moe_config.parse_moe_layers(moe_cfg, num_layers)
        self._layers_built = 0
        self.token_context = TokenContext(dictionary.pad())
        counts_V, source = None, "dict.txt"
        if count_tokens is not None and ROUTER_REGISTRY[moe_cfg.moe_router].needs_token_counts(moe_cfg):
            counts_V = count_tokens()
            source = "train split" if counts_V is not None else source
        if counts_V is None and getattr(dictionary, "count", None):
            counts_V = torch.tensor(dictionary.count, dtype=torch.long)
        self.vocab_info = VocabInfo(
            size=len(dictionary), pad=dictionary.pad(), eos=dictionary.eos(), counts_V=counts_V, counts_source=source
        )
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn)

    def build_decoder_layer(self, args, no_encoder_attn=False):
        index = self._layers_built
        self._layers_built += 1
        if index not in self.moe_layer_indices:
            return super().build_decoder_layer(args, no_encoder_attn)
        cfg = TransformerConfig.from_namespace(args)
        layer = MoEDecoderLayer(cfg, no_encoder_attn, self.moe_cfg, index, self.token_context, self.vocab_info)
        # checkpointing is the layer's own (MoEDecoderLayer.forward), not fairseq's wrapper
        return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not cfg.checkpoint_activations else 0)

    # --- BASE layers (moe_plugin/base_layer.py) ------------------------------------------
    def build_output_projection(self, cfg, dictionary, embed_tokens):
        """fairseq inserts its own BaseLayer (one expert per worker) here for --base-layers N;
        moe_plugin hides N from it and inserts its own BASE layers at the same positions."""
        from moe_plugin.base_layer import insert_base_layers

        num_base = cfg.base_layers
        cfg.base_layers = 0
        try:
            super().build_output_projection(cfg, dictionary, embed_tokens)
        finally:
            cfg.base_layers = num_base
        insert_base_layers(self, cfg)
    # --------------------------------------------------------------------------------------

    def extract_features(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        self.token_context.set(prev_output_tokens, incremental=incremental_state is not None)
        try:
            return super().extract_features(prev_output_tokens, encoder_out, incremental_state, **kwargs)
        finally:
            self.token_context.current = None


@register_model("moe_lm", dataclass=MoELanguageModelConfig)
class MoELanguageModel(TransformerLanguageModel):
    """fairseq's Transformer LM with MoE FFNs in the layers chosen by --moe-freq / --moe-layers."""

    @classmethod
    def build_model(cls, args, task):
        refuse_unsupported(args)
        if args.decoder_layers_to_keep:
            raise ValueError("--decoder-layers-to-keep: not supported by moe_lm (MoE layer indices would shift)")
        if getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = getattr(args, "tokens_per_sample", DEFAULT_MAX_TARGET_POSITIONS)
        dictionary = task.source_dictionary
        if args.character_embeddings:
            embed_tokens = CharacterTokenEmbedder(
                dictionary,
                eval(args.character_filters),
                args.character_embedding_dim,
                args.decoder_embed_dim,
                args.char_embedder_highway_layers,
            )
        elif args.adaptive_input:
            embed_tokens = AdaptiveInput(
                len(dictionary),
                dictionary.pad(),
                args.decoder_input_dim,
                args.adaptive_input_factor,
                args.decoder_embed_dim,
                options.eval_str_list(args.adaptive_input_cutoff, type=int),
                args.quant_noise_pq,
                args.quant_noise_pq_block_size,
            )
        else:
            embed_tokens = cls.build_embedding(args, dictionary, args.decoder_input_dim)
        if args.tie_adaptive_weights and not args.adaptive_input:
            raise ValueError("--tie-adaptive-weights: requires --adaptive-input")
        with ep_glue.decoder_base_layers(args):  # expert parallelism: moe_plugin/models/expert_parallel.py
            decoder = MoETransformerDecoder(
                args, task.target_dictionary, embed_tokens, no_encoder_attn=True,
                count_tokens=lambda: token_counts.training_token_counts(
                    task, getattr(args, "moe_train_subset", None), len(task.target_dictionary)),
            )
        return cls(decoder)

    # Checkpoint layout (expert count, router, which experts this rank holds): saved as the
    # model's extra state, checked before any tensor is loaded (moe_plugin/models/checkpoint_layout.py).
    def get_extra_state(self):
        return ep_layout.model_layout(self)

    def set_extra_state(self, state):
        ep_layout.apply_layout(self, state)

    def upgrade_state_dict_named(self, state_dict, name):
        super().upgrade_state_dict_named(state_dict, name)
        ep_layout.upgrade_state_dict(self, state_dict, name)

    def set_num_updates(self, num_updates):
        self.moe_last_update = int(num_updates)
        super().set_num_updates(num_updates)

    def moe_layers(self) -> List[Tuple[int, MoELayer]]:
        """(decoder layer index, MoE layer) for every MoE layer, in depth order."""
        out = []
        for i, layer in enumerate(self.decoder.layers):
            for m in layer.modules():
                if isinstance(m, MoELayer):
                    out.append((i, m))
        return out


def _refuse_moe_options(arch_name: str, args) -> None:
    """The dense baseline has no MoE layer: refuse every option that would add one (in every
    pass of the arch function) and, on the command line, every other MoE option the user gave
    (it would have no effect). A command line's Namespace holds only the flags the user gave
    (fairseq parses model options without defaults); a DictConfig (hydra, a checkpoint's cfg)
    holds every field, so there only the options that add MoE layers are checked."""
    moe_archs = f"an MoE arch ({', '.join(sorted(ARCHS))})"
    placement = (
        ("moe_layers", lambda v: v not in (None, "")),
        ("moe_freq", lambda v: v not in (None, 0)),
        ("base_layers", lambda v: v not in (None, 0)),
        ("moe_expert_parallel", bool),
    )
    for name, adds_layers in placement:
        value = getattr(args, name, None)
        if adds_layers(value):
            hint = f" (in a hydra config: model.{name}: 0)" if name == "moe_freq" else ""
            raise ValueError(
                f"--{name.replace('_', '-')}: {value!r} is not allowed with --arch {arch_name}, the dense "
                f"baseline without MoE layers{hint}; allowed: unset (no MoE layer), or use {moe_archs}"
            )
    if isinstance(args, argparse.Namespace):
        checked = {name for name, _ in placement} | {"moe_seed"}  # moe_seed: filled from --seed
        for f in dataclasses.fields(moe_config.MoEConfig):
            if f.name not in checked and getattr(args, f.name, None) is not None:
                raise ValueError(
                    f"--{f.name.replace('_', '-')}: {getattr(args, f.name)!r} has no effect with --arch "
                    f"{arch_name}, the dense baseline without MoE layers; allowed: leave it unset, or use {moe_archs}"
                )


def refuse_unsupported(args) -> None:
    """fairseq features the MoE archs cannot honour: one ValueError at build time.

    ``--ddp-backend fully_sharded``: fairseq builds the model inside fairscale's auto-wrap
    context (``fsdp_enable_wrap``), seen here whether the run came from the command line or
    a hydra config. FSDP flattens and shards every parameter over the ranks: expert-parallel
    experts differ per rank, the frozen routers (hyper, smoe_dropout) mix parameters with and
    without ``requires_grad`` in one flat buffer, and it cannot be run on CPU to be checked.
    """
    backend = getattr(args, "ddp_backend", None)
    in_fsdp = False
    try:
        from fairscale.nn.wrap.auto_wrap import ConfigAutoWrap

        in_fsdp = bool(ConfigAutoWrap.in_autowrap_context)
    except ImportError:  # fairscale absent: fairseq cannot build FSDP either
        pass
    if backend == "fully_sharded" or in_fsdp:
        raise ValueError(
            "--ddp-backend: 'fully_sharded' is not allowed with the moe_lm archs; allowed: legacy_ddp, "
            "no_c10d (expert parallelism needs one of these), c10d, pytorch_ddp (FSDP shards every "
            "parameter over the ranks, which per-rank experts and frozen router parameters do not survive)"
        )


def _make_arch(arch_name: str, router: Optional[str], defaults: dict):
    """Register ``arch_name`` on moe_lm: its router and default options, then the MoE core
    defaults and fairseq's ``base_lm_architecture``, which every arch (dense_lm included)
    shares. ``router=None``: the dense baseline (no MoE layer, MoE options refused)."""

    def arch(args):
        if router is None:
            _refuse_moe_options(arch_name, args)
        # the arch names its router unless the user chose one with --moe-router
        elif getattr(args, "moe_router", None) is None:
            args.moe_router = router
        for name, value in defaults.items():
            if getattr(args, name, None) is None:
                # a callable default is computed from the args (e.g. hash_lm's one MoE layer)
                setattr(args, name, value(args) if callable(value) else value)
        # defaults a router computes from the whole command line (the top-K routers: their
        # schedule, whose length defaults to --max-update; moe_plugin/routing/_topk.py)
        complete = getattr(ROUTER_REGISTRY.get(getattr(args, "moe_router", None)), "complete_arch_args", None)
        if complete is not None:
            complete(args)
        for f in dataclasses.fields(moe_config.MoEConfig):
            if getattr(args, f.name, None) is None and f.default is not None:
                setattr(args, f.name, f.default)
        fairseq_base_lm_architecture(args)
        refuse_unsupported(args)
        ep_glue.prepare_args(args)

    arch.__name__ = f"{arch_name}_architecture"
    register_model_architecture("moe_lm", arch_name)(arch)
    return arch


ARCH_FUNCTIONS = {name: _make_arch(name, router, defaults) for name, (router, defaults) in ARCHS.items()}
# The dense baseline of the MoE archs: this model without MoE layers, with their defaults
# (pre-LN, a final LayerNorm, input/output dims = --decoder-embed-dim: fairseq's
# base_lm_architecture). fairseq's own `--arch transformer_lm` differs: its arch function is a
# no-op, so its dataclass defaults apply (post-LN, no final LayerNorm, 512-wide input/output
# dims with projections); see docs/fidelity.md, section dense.
ARCH_FUNCTIONS[moe_config.DENSE_ARCH] = _make_arch(moe_config.DENSE_ARCH, None, {"moe_freq": 0})
