"""Qwen3 (`Qwen3ForCausalLM`), the dense one: Llama's layers with RMSNorm of each query and key head
(`qk_norm: head`), any head_dim, optional biases on all four attention projections."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moectl.convert.families.base import Family

if TYPE_CHECKING:
    from moectl.recipe.schema import ModelConfig


class Qwen3(Family):
    name = "Qwen3"
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    moe = False
    order = 60
    qk_norm = "head"

    windows = "layers"

    def config_to_hf(self, m: ModelConfig) -> dict[str, Any]:
        return {"intermediate_size": m.ffn_hidden, "attention_bias": m.attention_bias == "all",
                **self.windows_to_hf(m)}
