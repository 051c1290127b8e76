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
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase

from moe_plugin import config as moe_config
from moe_plugin.moe_layer import MoELayer, build_moe_layer
from moe_plugin.parallel import fairseq_glue as ep_glue, layout as ep_layout
from moe_plugin.routing import ARCHS, TokenInfo, VocabInfo


MoELanguageModelConfig = dataclasses.make_dataclass(
    "MoELanguageModelConfig",
    # the routers' random state follows fairseq's --seed (common.seed) unless a router's own
    # seed option fixes it; an interpolation, so fairseq-train and hydra configs both fill it
    [("moe_seed", Optional[int], dataclasses.field(default=II("common.seed")))],
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
        # read by build_fc1, which fairseq's __init__ calls (plain attributes may be set
        # before nn.Module.__init__)
        self._moe_build_args = (cfg, moe_cfg, layer_index, vocab)
        super().__init__(cfg, no_encoder_attn)
        del self._moe_build_args
        self.layer_index = layer_index
        self.fc1.token_source = token_context.get
        self.activation_fn = _identity  # the experts apply the activation themselves

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
        return super().forward(x, *args, **kwargs)

    @property
    def moe(self) -> MoELayer:
        return self.fc1


class MoETransformerDecoder(TransformerDecoder):
    def __init__(self, args, dictionary, embed_tokens, no_encoder_attn=True):
        num_layers = args.decoder_layers
        moe_cfg = moe_config.from_fairseq(args)
        moe_config.validate(moe_cfg, num_layers)
        # set before fairseq's __init__, which calls build_decoder_layer once per layer
        self.moe_cfg = moe_cfg
        self.moe_layer_indices = moe_config.parse_moe_layers(moe_cfg, num_layers)
        self._layers_built = 0
        self.token_context = TokenContext(dictionary.pad())
        self.vocab_info = VocabInfo(
            size=len(dictionary),
            pad=dictionary.pad(),
            eos=dictionary.eos(),
            counts_V=torch.tensor(dictionary.count, dtype=torch.long) if getattr(dictionary, "count", None) else None,
        )
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn)

    def build_decoder_layer(self, args, no_encoder_attn=False):
        index = self._layers_built
        self._layers_built += 1
        if index not in self.moe_layer_indices:
            return super().build_decoder_layer(args, no_encoder_attn)
        cfg = TransformerConfig.from_namespace(args)
        layer = MoEDecoderLayer(cfg, no_encoder_attn, self.moe_cfg, index, self.token_context, self.vocab_info)
        if cfg.checkpoint_activations:
            layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
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
        with ep_glue.decoder_base_layers(args):  # expert parallelism: moe_plugin/parallel/fairseq_glue.py
            decoder = MoETransformerDecoder(args, task.target_dictionary, embed_tokens, no_encoder_attn=True)
        return cls(decoder)

    # Checkpoint layout (expert count, router, which experts this rank holds): saved as the
    # model's extra state, checked before any tensor is loaded (moe_plugin/parallel/layout.py).
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


def _make_arch(arch_name: str, router: str, defaults: dict):
    def arch(args):
        # the arch names its router unless the user chose one with --moe-router
        if getattr(args, "moe_router", None) is None:
            args.moe_router = router
        for name, value in defaults.items():
            if getattr(args, name, None) is None:
                # a callable default is computed from the args (e.g. hash_lm's one MoE layer)
                setattr(args, name, value(args) if callable(value) else value)
        for f in dataclasses.fields(moe_config.MoEConfig):
            if getattr(args, f.name, None) is None and f.default is not None:
                setattr(args, f.name, f.default)
        fairseq_base_lm_architecture(args)
        ep_glue.prepare_args(args)

    arch.__name__ = f"{arch_name}_architecture"
    register_model_architecture("moe_lm", arch_name)(arch)
    return arch


ARCH_FUNCTIONS = {name: _make_arch(name, router, defaults) for name, (router, defaults) in ARCHS.items()}
