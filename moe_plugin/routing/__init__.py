"""Routers: one file per scheme, each registering itself on import.

A new scheme is one new module here plus one line below.
"""

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
from moe_plugin.routing import gshard, switch  # noqa: F401,E402
