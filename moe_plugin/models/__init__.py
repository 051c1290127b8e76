"""The fairseq shell: the model (moe_lm.py), its archs (archs.py), BASE-layer insertion
(base_layers.py), expert-parallel options (expert_parallel.py), checkpoint layout."""

from moe_plugin.models.moe_lm import MoELanguageModel, MoETransformerDecoder  # noqa: F401
from moe_plugin.models import archs  # noqa: F401  (registers the archs with fairseq)
