from moe_plugin.criterions import moe_cross_entropy  # noqa: F401
