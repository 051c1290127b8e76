from moe_plugin.models.moe_lm import MoELanguageModel, MoETransformerDecoder  # noqa: F401
