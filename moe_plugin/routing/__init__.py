"""Routers: one file per scheme, each registering itself (and its options and arch) on import.

Every module of this package is imported here, so a new scheme is one new file.
"""

import importlib
import pkgutil

from moe_plugin.routing.interface import (  # noqa: F401
    ARCHS,
    DEMO_ARGS,
    DROPPED,
    ROUTER_OPTIONS,
    ROUTER_REGISTRY,
    Router,
    RouterOutput,
    TokenInfo,
    VocabInfo,
    build_router,
    register_router,
)

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")
