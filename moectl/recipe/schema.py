"""The recipe schema: one typed, strict description of a run.

Every field carries a description; `moectl recipes schema` turns this module into JSON Schema and
docs/recipe-reference.md is generated from it, so the schema is the single source of truth for
what a recipe may say. Checks that involve several fields live in `checks.py` so that their errors
can name the exact key path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Section(BaseModel):
    """Base of every recipe section: unknown keys and loose types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


# --------------------------------------------------------------------------- routers


class TopKRouter(Section):
    """Token-choice top-k: each token picks its k highest-scoring experts."""

    kind: Literal["topk"] = Field("topk", description="Router kind.")
    score_func: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="How logits become scores: softmax over experts, or per-expert sigmoid."
    )
    renormalize: bool = Field(
        True, description="Divide the k selected scores by their sum (Mixtral); false keeps raw scores (Switch)."
    )
    jitter_eps: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="In training, multiply the router input by U(1-eps, 1+eps). 0 disables."
    )
    bias_update_rate: NonNegFloat = Field(
        0.0,
        description="Aux-loss-free balancing (DeepSeek-V3): per-expert selection bias moved by this "
        "rate after each optimizer step towards balanced load. 0 disables.",
    )


class ExpertChoiceRouter(Section):
    """Expert choice: each expert picks its top-C tokens of the batch."""

    kind: Literal["expert_choice"] = Field("expert_choice", description="Router kind.")
    capacity_factor: PosFloat = Field(
        1.0, description="C = capacity_factor * T * top_k / num_experts tokens per expert."
    )


class HashRouter(Section):
    """Fixed routing from a random per-token-id table; nothing in it is learned."""

    kind: Literal["hash"] = Field("hash", description="Router kind.")
    seed: NonNegInt = Field(0, description="Seed of the fixed random [vocab, experts] table.")


class TopPRouter(Section):
    """Top-p: experts in descending probability until the cumulative probability exceeds p."""

    kind: Literal["topp"] = Field("topp", description="Router kind.")
    p: Annotated[float, Field(gt=0, le=1)] = Field(0.4, description="Cumulative probability threshold.")
    max_k: PosInt | None = Field(
        None, description="Most experts a token may use (default: num_experts)."
    )


def _default_kind(v: Any) -> Any:
    """A router section without `kind` is the default top-k router."""
    if isinstance(v, dict) and "kind" not in v:
        return {"kind": "topk", **v}
    return v


RouterConfig = Annotated[
    Union[TopKRouter, ExpertChoiceRouter, HashRouter, TopPRouter],
    Field(discriminator="kind"),
    BeforeValidator(_default_kind),
]


# --------------------------------------------------------------------------- model


def _layers_value(v: Any) -> Any:
    """`layers` is a word or an explicit list; give one clear error instead of one per branch."""
    if isinstance(v, str):
        if v not in ("all", "every_other"):
            raise ValueError(f"must be 'all', 'every_other' or a list of layer indices, got {v!r}")
        return v
    if isinstance(v, list):
        bad = [x for x in v if isinstance(x, bool) or not isinstance(x, int)]
        if bad:
            raise ValueError(f"layer indices must be integers, got {bad[0]!r}")
        return v
    raise ValueError(f"must be 'all', 'every_other' or a list of layer indices, got {v!r}")


MoELayers = Annotated[
    Union[str, list[int]],
    BeforeValidator(_layers_value),
    WithJsonSchema({"anyOf": [{"enum": ["all", "every_other"]},
                              {"type": "array", "items": {"type": "integer", "minimum": 0}}]}),
]


class MoEConfig(Section):
    """Which layers are Mixture-of-Experts layers and how they route."""

    num_experts: PosInt = Field(..., description="Routed experts per MoE layer (N).")
    top_k: PosInt = Field(
        ...,
        description="Experts per token (k). For `topp` it is the nominal k used for parameter and "
        "FLOP accounting; for `expert_choice` it sets the expert capacity.",
    )
    expert_hidden: PosInt = Field(..., description="Hidden width of each routed expert.")
    layers: MoELayers = Field(
        "all",
        description="MoE placement: 'all', 'every_other' (starting at the first MoE-eligible layer) "
        "or an explicit list of layer indices.",
    )
    first_dense: NonNegInt = Field(
        0, description="Number of leading layers kept dense (with 'all' or 'every_other')."
    )
    shared_experts: NonNegInt = Field(0, description="Always-on shared experts per MoE layer.")
    shared_hidden: PosInt | None = Field(
        None, description="Hidden width of each shared expert (default: expert_hidden)."
    )
    shared_mix: Literal["add", "gate"] = Field(
        "add",
        description="How shared and routed outputs combine: 'add' (sum) or 'gate' (learned "
        "per-token 2-way softmax).",
    )
    capacity_factor: PosFloat | None = Field(
        None,
        description="Token-choice capacity: each expert takes at most ceil(c * T * k / N) slots per "
        "batch, overflow is dropped (the residual carries it). null = dropless.",
    )
    backend: Literal["loop", "grouped_mm"] = Field(
        "grouped_mm",
        description="Expert computation: 'loop' (plain reference) or 'grouped_mm' (one grouped GEMM; "
        "falls back to the loop where the device or dtype cannot run it).",
    )
    aux_loss_weight: NonNegFloat = Field(0.01, description="Weight of the load-balance loss.")
    z_loss_weight: NonNegFloat = Field(0.001, description="Weight of the router z-loss.")
    router: RouterConfig = Field(default_factory=TopKRouter, description="The router; `kind` selects it.")

    def layer_indices(self, n_layers: int) -> list[int]:
        """The indices of the MoE layers in a model of `n_layers` layers."""
        if isinstance(self.layers, list):
            return sorted(self.layers)
        step = 1 if self.layers == "all" else 2
        return list(range(self.first_dense, n_layers, step))


class ModelConfig(Section):
    """A decoder-only transformer (pre-norm, RMSNorm, RoPE, causal attention)."""

    vocab_size: PosInt = Field(..., description="Vocabulary size (the tokenizer's size must fit in it).")
    d_model: PosInt = Field(..., description="Residual stream width (d).")
    n_layers: PosInt = Field(..., description="Number of transformer layers.")
    n_heads: PosInt = Field(..., description="Attention heads; d_model must be divisible by it.")
    n_kv_heads: PosInt | None = Field(
        None, description="Key/value heads for grouped-query attention (default: n_heads)."
    )
    ffn_hidden: PosInt = Field(..., description="Hidden width of the dense FFN layers.")
    activation: Literal["swiglu", "gelu", "relu"] = Field(
        "swiglu", description="FFN and expert activation; swiglu has three matrices, the others two."
    )
    seq_len: PosInt = Field(1024, description="Training context length in tokens.")
    rope_theta: PosFloat = Field(10000.0, description="RoPE base.")
    norm_eps: PosFloat = Field(1e-5, description="RMSNorm epsilon.")
    tie_embeddings: bool = Field(False, description="Share the input embedding with the LM head.")
    init_std: PosFloat = Field(0.02, description="Std of the normal initialisation of weights.")
    scale_residual_init: bool = Field(
        True, description="Scale output projections' init by 1/sqrt(2 * n_layers) (GPT-2 style)."
    )
    moe: MoEConfig | None = Field(None, description="Mixture-of-Experts settings; null = dense model.")


class Recipe(Section):
    """A moectl recipe."""

    extends: str | None = Field(
        None,
        description="A base recipe (path relative to this file, or a shipped recipe name) whose "
        "values this file overrides; resolved before validation.",
    )
    name: str = Field("run", description="Run name; the default run folder is runs/<name>.")
    description: str = Field("", description="Free text shown by `moectl recipes list`.")
    seed: NonNegInt = Field(0, description="Seed for initialisation, data order and routing noise.")
    model: ModelConfig = Field(..., description="The model.")


SECTION_TYPES: tuple[type[BaseModel], ...] = (Recipe,)
