"""moectl's engine: single-device model code that knows nothing of recipes, files or the CLI.

    from moectl.core import MoETransformer, ModelArgs, MoEArgs
    model = MoETransformer(ModelArgs(vocab_size=256, d_model=64, n_layers=2, n_heads=4, ffn_hidden=128,
                                     moe=MoEArgs(num_experts=4, top_k=2, expert_hidden=64, layers=[0, 1])))

Importing this package registers the built-in routers, block kinds and routed-layer variants
(`moectl.core.registry`). The shape-suffix legend (`x_TD`, `logits_TE`, ...) is at the top of
`moectl.core.routers.base`.
"""

from moectl.core import compete  # noqa: F401  (registers the competition variant)
from moectl.core.accounting import count_parameters, training_memory
from moectl.core.config import ModelArgs, MoEArgs
from moectl.core.model import (
    CartesianOptions,
    ModelOutput,
    MoEBlock,
    MoETransformer,
    StandardOptions,
    register_block,
)
from moectl.core.moe import RoutedFFN, RoutingPlan, RoutingRecord, register_variant
from moectl.core.registry import option
from moectl.core.routers import (
    ExpertChoiceOptions,
    HashOptions,
    RecurrentOptions,
    RouteContext,
    Router,
    RouterOutput,
    RoutingMode,
    TopKOptions,
    TopPOptions,
    make_router,
    register_router,
    router_registry,
)

__all__ = [
    "CartesianOptions", "ExpertChoiceOptions", "HashOptions", "ModelArgs", "ModelOutput", "MoEArgs", "MoEBlock",
    "MoETransformer", "RecurrentOptions", "RouteContext", "RoutedFFN", "Router", "RouterOutput", "RoutingMode",
    "RoutingPlan", "RoutingRecord", "StandardOptions", "TopKOptions", "TopPOptions", "count_parameters",
    "make_router", "option", "register_block", "register_router", "register_variant", "router_registry",
    "training_memory",
]
