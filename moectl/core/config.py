"""Plain, typed arguments for the engine. The recipe layer fills these; notebooks can too."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CompetitionArgs:
    """CompeteSMoE: route by the experts' responses on scheduled steps, and distil that into the router."""

    rate: float = 0.07                 # probability that a layer competes at a step
    warmup: float = 0.05               # fraction of training without competition
    max_layers: int = 3                # cap on competing layers per step (fixed schedule)
    schedule: str = "fixed"            # "fixed" (precomputed from the seed) | "bernoulli" (2024: per forward)
    response: str = "mean_softplus"    # "mean_softplus" (2025) | "l2_norm" (2024)
    gate: str = "linear"               # "linear" (2025) | "softmax" (2024)
    theta: float = 0.2                 # weight of the winners-only term of the router loss
    router_loss_weight: float = 0.001
    diversity_weight: float = 0.005
    balance_weight: float = 0.01


@dataclass
class MoEArgs:
    num_experts: int
    top_k: int
    expert_hidden: int
    layers: list[int]                      # indices of the MoE layers
    shared_experts: int = 0
    shared_hidden: int | None = None       # default: expert_hidden
    shared_mix: str = "add"                # "add" | "gate"
    capacity_factor: float | None = None   # None = dropless
    backend: str = "grouped_mm"            # "loop" | "grouped_mm"
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    block: str = "standard"                # MoE layer kind (see core.model.MLP_BLOCKS)
    router_kind: str = "topk"
    router_options: dict[str, Any] = field(default_factory=dict)
    competition: CompetitionArgs | None = None


@dataclass
class ModelArgs:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_hidden: int
    n_kv_heads: int | None = None
    activation: str = "swiglu"             # "swiglu" | "gelu" | "relu"
    seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    scale_residual_init: bool = True
    moe: MoEArgs | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads
