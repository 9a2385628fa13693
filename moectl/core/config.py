"""Plain, typed arguments for the engine. The recipe layer fills these; notebooks can too.

Modules take these objects whole (`RoutedFFN(args, index, name)`), so every option is spelled
once on the engine side. The router, the block kind and the routed-layer variant are given as
instances of their registered options dataclasses (see `moectl.core.registry`):

    MoEArgs(num_experts=8, top_k=2, expert_hidden=256, layers=[1, 3],
            router=RecurrentOptions(hidden=64), block=CartesianOptions())
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from moectl.core import registry

# MoEArgs fields that hold a registered part's options, and the registry of each
PARTS = {"router": "routers", "block": "blocks", "variant": "variants"}


def _default(registry_name: str, kind: str):
    def make() -> Any:   # called once moectl.core (whose import registers the built-in parts) is loaded
        return getattr(registry, registry_name).default_options(kind)

    return make


@dataclass
class MoEArgs:
    num_experts: int
    top_k: int
    expert_hidden: int
    layers: list[int]                      # indices of the MoE layers
    shared_experts: int = 0
    shared_hidden: int | None = None       # default: expert_hidden
    shared_mix: str = "add"                # "add" | "gate" | "sigmoid"
    shared_reduce: str = "sum"             # "sum" | "mean" of several shared experts
    capacity_factor: float | None = None   # None = dropless
    backend: str = "auto"                  # "auto" | "loop" | "grouped_mm" | "triton" (moectl.core.experts)
    expert_bias: bool = False              # biases after every expert projection (GPT-OSS)
    init: str | None = None                # scheme of routers, experts, shared experts (moectl.core.init)
    router_init: str | None = None         # scheme of the routers alone
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    balance_form: str = "switch"           # "switch" | "switch_top1" | "entropy" (moectl.core.losses.BalanceSpec)
    balance_pooling: str = "batch"         # "batch" | "sequence"
    balance_over_layers: str = "sum"       # "sum" | "mean" of the weighted per-layer balance losses
    router: Any = field(default_factory=_default("routers", "topk"))        # a router's options
    block: Any = field(default_factory=_default("blocks", "standard"))     # a block kind's options
    variant: Any = None                    # a routed-layer variant's options (e.g. competition); None = plain

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; each part's options as {"kind": its registered name, **options}."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["layers"] = list(self.layers)
        for key, reg in PARTS.items():
            options = data[key]
            if options is not None:
                data[key] = {"kind": getattr(registry, reg).of(options).name, **asdict(options)}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEArgs:
        """The arguments `to_dict` wrote, each part's options rebuilt from its registry by kind."""
        data = dict(data)
        for key, reg in PARTS.items():
            if data.get(key) is not None:
                options = dict(data[key])
                data[key] = getattr(registry, reg).get(options.pop("kind")).options(**options)
        return cls(**data)


@dataclass
class ModelArgs:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_hidden: int
    n_kv_heads: int | None = None
    activation: str = "swiglu"             # "swiglu" | "gelu" | "relu" | "swiglu_clamped"
    seq_len: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None       # {"kind": "linear" | "llama3" | "yarn", "factor": ...}; see rope_frequencies
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    scale_residual_init: bool = True
    init: str = "scaled_normal"            # "scaled_normal" | "torch_default" (moectl.core.init)
    head_dim: int | None = None            # attention head size; default d_model // n_heads
    attention_bias: str = "none"           # "none" | "qkv" | "all"
    qk_norm: str = "none"                  # "none" | "head" | "projection"
    qkv_clip: float | None = None
    sliding_window: int | None = None      # attend to the window's last positions only, in sliding_layers
    sliding_layers: str | list = "all"     # "all" | "even" | "odd" | [layer indices]
    attention_sinks: bool = False          # a learned per-head logit in every query's softmax
    latent_attention: dict | None = None   # MLA: {q_rank, kv_rank, nope_dim, rope_dim, v_dim} (LatentAttention)
    moe: MoEArgs | None = None

    def window(self, layer: int) -> int | None:
        """Layer `layer`'s attention window (None: its whole past)."""
        which = self.sliding_layers
        if self.sliding_window is None:
            return None
        inside = (which == "all" or (which == "even" and layer % 2 == 0) or (which == "odd" and layer % 2 == 1)
                  or (isinstance(which, list) and layer in which))
        return self.sliding_window if inside else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (json.dumps writes it as it is); `from_dict` reads it back."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling is not None else None
        data["latent_attention"] = dict(self.latent_attention) if self.latent_attention is not None else None
        data["moe"] = self.moe.to_dict() if self.moe is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelArgs:
        data = dict(data)
        moe = data.pop("moe", None)
        return cls(**data, moe=MoEArgs.from_dict(moe) if moe is not None else None)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """The dimensions RoPE rotates: a head's, or latent attention's rope_dim."""
        return self.latent_attention["rope_dim"] if self.latent_attention else self.head_size

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads
