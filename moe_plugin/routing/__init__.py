"""Routers: one file per scheme, each registering itself (its options and its arch, as plain data) on import.

Every module of this package is imported here, so a new scheme is one new file.
"""

import importlib
import pkgutil

from moe_plugin.routing.interface import (  # noqa: F401
    DROPPED,
    ROUTER_OPTIONS,
    ROUTER_REGISTRY,
    Router,
    RouterOutput,
    TokenInfo,
    VocabInfo,
    build_router,
    on_register,
    register_router,
)

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")
