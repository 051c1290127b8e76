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

Every routing scheme declares an arch (``switch_lm``, ``gshard_lm``, ...) in its router
file; moe_plugin/models/archs.py registers them on this one model (and on a subclass of it
for a router registered after this module was loaded: :func:`model_config_class`).
"""


import dataclasses
import typing
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from fairseq import options
from omegaconf import II
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.distributed import fsdp_wrap
from fairseq.models import register_model
from fairseq.models.transformer import TransformerConfig, TransformerDecoder
from fairseq.models.transformer_lm import (
    DEFAULT_MAX_TARGET_POSITIONS,
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
)
from fairseq.modules import AdaptiveInput, CharacterTokenEmbedder
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase

from moe_plugin import config as moe_config
from moe_plugin.moe_layer import MoELayer, build_moe_layer, checkpointed
from moe_plugin.models import base_layers as base_glue
from moe_plugin.models import checkpoint_layout as ep_layout, expert_parallel as ep_glue
from moe_plugin.models import token_counts
from moe_plugin.routing import ROUTER_REGISTRY, TokenInfo, VocabInfo


#: OmegaConf resolver of an MoE option's default in the model dataclass: the value the arch
#: named by the config's ``_name`` gives it (registered by moe_plugin/models/archs.py)
ARCH_DEFAULT_RESOLVER = "moe_arch_default"


#: a relative interpolation: the model node's own decoder_embed_dim
EMBED_DIM = "${.decoder_embed_dim}"


def model_config_class() -> type:
    """The model's config dataclass: fairseq's Transformer LM config, the current MoE options
    (:func:`moe_plugin.config.moe_config_class`: the core's and every registered router's)
    and the shell's own fields.

    The default of every MoE option is the arch's: an interpolation
    ``${moe_arch_default:${._name},FIELD}`` resolving to what the arch function of
    ``model._name`` would fill (its router, its plain defaults, else the core default;
    None for a default the arch computes from the whole config, which the arch function fills
    when the model is built). fairseq's hydra path merges this dataclass's defaults into the
    config *before* the arch function runs, and an arch function fills only unset fields, so
    a plain default here would hide the arch's (``moe_router="switch"`` built Switch routers
    for ``model._name: hyper_lm``). ``model._name: moe_lm`` gets the core defaults, and no
    router: that config must name it. (``add_args`` generates the command-line options from
    a copy without these defaults: :func:`parser_config_class`.)
    """
    moe_cls = moe_config.moe_config_class()
    types = typing.get_type_hints(moe_cls)  # a router's options may use string annotations
    moe_fields = []
    for f in dataclasses.fields(moe_cls):
        if f.name == "moe_seed":
            continue
        default = f"${{{ARCH_DEFAULT_RESOLVER}:${{._name}},{f.name}}}"
        moe_fields.append((f.name, Optional[types[f.name]], dataclasses.field(default=default, metadata=dict(f.metadata))))
    shell_fields = [
        # the archs' model (fairseq's base_lm_architecture: pre-LN, input and output dims = the
        # embedding dim) as the dataclass's defaults too: a hydra config gets them merged before
        # any arch function runs (and `_name: moe_lm` runs none), so fairseq's 512 / post-LN
        # defaults would silently build another model than the command line
        ("decoder_input_dim", Optional[int], dataclasses.field(default=EMBED_DIM, metadata={
            "help": "decoder input dimension (default: --decoder-embed-dim)"})),
        ("decoder_output_dim", Optional[int], dataclasses.field(default=EMBED_DIM, metadata={
            "help": "decoder output dimension (default: --decoder-embed-dim)"})),
        ("decoder_normalize_before", bool, dataclasses.field(default=True, metadata={
            "help": "apply layernorm before each decoder block (the MoE archs: always, as fairseq's "
                    "base_lm_architecture)"})),
        # the routers' random state follows fairseq's --seed (common.seed) unless a router's own
        # seed option fixes it; an interpolation, so fairseq-train and hydra configs both fill it
        ("moe_seed", Optional[int], dataclasses.field(default=II("common.seed"))),
        # the split a frequency-balanced router counts its tokens in (moe_plugin/models/token_counts.py)
        ("moe_train_subset", Optional[str], dataclasses.field(default=II("dataset.train_subset"))),
        # BASE layers and fairseq's per-rank checkpoint switch (moe_plugin/models/base_layers.py)
        ("moe_base_layers", Optional[int], dataclasses.field(default=None, metadata={
            "help": "number of BASE layers inserted into the decoder (what fairseq's --base-layers N means; "
                    "unset: --base-layers). In a hydra config write this, not base_layers"})),
        ("base_layers", Optional[int], dataclasses.field(
            default=base_glue.BASE_LAYERS_DEFAULT, metadata={
                "help": "number of BASE layers (fairseq's option); in the saved config and a hydra config it is "
                        "fairseq's per-rank checkpoint switch, derived: moe_base_layers + 1 with "
                        "--moe-expert-parallel, else moe_base_layers (moe_plugin/models/base_layers.py)"})),
    ]
    return dataclasses.make_dataclass(
        "MoELanguageModelConfig", moe_fields + shell_fields, bases=(TransformerLanguageModelConfig,)
    )


MoELanguageModelConfig = model_config_class()


def parser_config_class(dc: type) -> type:
    """``dc`` (a model config dataclass) with default None where its default is one of the
    plugin's interpolations: fairseq's parser would make an interpolation default a string
    option without its type or flag action (command-line defaults are deleted anyway: the
    arch function fills them)."""
    prefixes = ("${" + ARCH_DEFAULT_RESOLVER + ":", "${" + base_glue.RESOLVER + ":", EMBED_DIM)
    fields = [(f.name, f.type, dataclasses.field(default=None, metadata=dict(f.metadata)))
              for f in dataclasses.fields(dc) if isinstance(f.default, str) and f.default.startswith(prefixes)]
    return dataclasses.make_dataclass(dc.__name__, fields, bases=(dc,))


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
            batch_size=B,
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
        # BASE layers: the count the config asks for (moe_plugin/models/base_layers.py)
        self.base_layer_count = base_glue.base_layer_count(args)
        self._layers_built = 0
        self.token_context = TokenContext(dictionary.pad())
        counts_V, source = None, "dict.txt"
        router_cls = ROUTER_REGISTRY.get(moe_cfg.moe_router)  # None: no MoE layer (dense_lm)
        if count_tokens is not None and router_cls is not None and router_cls.needs_token_counts(moe_cfg):
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

    def build_output_projection(self, cfg, dictionary, embed_tokens):
        """fairseq inserts its own BaseLayer (one expert per worker) here for base_layers > 0;
        it is given a copy of ``cfg`` without them, and the plugin's BASE layers go in at the
        same positions (moe_plugin/models/base_layers.py)."""
        super().build_output_projection(base_glue.without_fairseq_base_layers(cfg), dictionary, embed_tokens)
        base_glue.insert_base_layers(self, cfg, self.base_layer_count)

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
    def add_args(cls, parser):
        """fairseq's hook for ``--arch``'s options (called at parse time): the options of this
        model's registered config dataclass (:func:`parser_config_class`)."""
        gen_parser_from_dataclass(parser, parser_config_class(getattr(cls, "__dataclass"))(), delete_default=True)

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
        ep_glue.check_rank_checkpoints(args)  # expert parallelism: moe_plugin/models/expert_parallel.py
        decoder = MoETransformerDecoder(
            args, task.target_dictionary, embed_tokens, no_encoder_attn=True,
            count_tokens=lambda: token_counts.training_token_counts(
                task, getattr(args, "moe_train_subset", None), len(task.target_dictionary)),
        )
        return cls(decoder)

    # Checkpoint layout (expert count, router, which experts this rank holds): saved as the
    # model's extra state, checked before any tensor is loaded (moe_plugin/models/checkpoint_layout.py).
    def get_extra_state(self):
        # a saved state_dict computes this first: lazily read router state (a hash table file)
        # goes in before the checksums are taken (never on load: set_extra_state reads no file)
        for _, layer in self.moe_layers():
            layer.router.materialize()
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
