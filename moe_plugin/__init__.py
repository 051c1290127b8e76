"""moe_plugin: sparse Mixture-of-Experts language models for fairseq (``--user-dir moe_plugin``).

The core (``routing``, ``experts``, ``dispatch``, ``moe_layer``, ``config``) has no fairseq
import. Importing the package registers the fairseq pieces (model, archs, criterion) when
fairseq is installed; fairseq's ``--user-dir`` imports it.
"""

__version__ = "0.1.0"

try:
    import fairseq  # noqa: F401
except ImportError:  # the core works without fairseq
    pass
else:
    from moe_plugin import criterions, models  # noqa: F401
