"""Routers, one module each; importing this package registers them all."""

from moectl.core.routers import expert_choice, hash, recurrent, topk, topp  # noqa: F401
from moectl.core.routers.base import (  # noqa: F401
    RouteContext,
    Router,
    RouterOutput,
    RoutingMode,
    fp32_linear,
    make_router,
    register_router,
    router_registry,
    routing_losses,
)
from moectl.core.routers.expert_choice import ExpertChoiceOptions  # noqa: F401
from moectl.core.routers.hash import HashOptions  # noqa: F401
from moectl.core.routers.recurrent import RecurrentOptions  # noqa: F401
from moectl.core.routers.topk import TopKOptions, select_topk  # noqa: F401
from moectl.core.routers.topp import TopPOptions  # noqa: F401
