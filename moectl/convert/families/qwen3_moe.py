"""Qwen3-MoE (`Qwen3MoeForCausalLM`): RMSNorm of each query and key head (`qk_norm: head`), any
head_dim, optional attention biases, dense layers anywhere, no shared expert."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moectl.convert.families.base import (
    ConfigReader,
    Family,
    sparse_layers_from_hf,
    sparse_layers_to_hf,
)

if TYPE_CHECKING:
    from moectl.recipe.schema import ModelConfig


class Qwen3Moe(Family):
    name = "Qwen3-MoE"
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    order = 30
    qk_norm = "head"

    def config_to_hf(self, m: ModelConfig) -> dict[str, Any]:
        e = m.moe
        return {"num_experts": e.num_experts, "norm_topk_prob": e.router.renormalize,
                "intermediate_size": m.ffn_hidden, "moe_intermediate_size": e.expert_hidden,
                **sparse_layers_to_hf(m), "use_sliding_window": False, "sliding_window": None,
                "attention_bias": m.attention_bias == "all"}

    def experts_from_hf(self, c: ConfigReader, model: dict[str, Any]) -> dict[str, Any]:
        return {"expert_hidden": c.need("moe_intermediate_size"), "layers": sparse_layers_from_hf(c, model["n_layers"])}
