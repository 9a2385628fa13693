"""Routers, one module each; importing this package registers them all."""

from moectl.core.routers import expert_choice, hash, recurrent, topk, topp  # noqa: F401
from moectl.core.routers.base import (  # noqa: F401
    RouteContext,
    Router,
    RouterOutput,
    make_router,
    register_router,
    router_registry,
)
