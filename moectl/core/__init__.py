"""moectl's engine: single-device model code that knows nothing of recipes, files or the CLI.

    from moectl.core import MoETransformer, ModelArgs, MoEArgs
    model = MoETransformer(ModelArgs(vocab_size=256, d_model=64, n_layers=2, n_heads=4, ffn_hidden=128,
                                     moe=MoEArgs(num_experts=4, top_k=2, expert_hidden=64, layers=[0, 1])))
"""

from moectl.core.accounting import count_parameters, training_memory
from moectl.core.config import ModelArgs, MoEArgs
from moectl.core.model import MLP_BLOCKS, ModelOutput, MoETransformer
from moectl.core.moe import RoutedFFN, RoutingRecord
from moectl.core.routers import (
    RouteContext,
    Router,
    RouterOutput,
    make_router,
    register_router,
    router_registry,
)

__all__ = [
    "MLP_BLOCKS", "ModelArgs", "ModelOutput", "MoEArgs", "MoETransformer", "RoutedFFN", "RouteContext",
    "Router", "RouterOutput", "RoutingRecord", "count_parameters", "make_router", "register_router",
    "router_registry", "training_memory",
]
