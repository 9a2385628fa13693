"""Llama (`LlamaForCausalLM`): the dense model (`model.moe: null`), optional biases on all four
attention projections; also what `--upcycle` reads."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moectl.convert.families.base import Family

if TYPE_CHECKING:
    from moectl.recipe.schema import ModelConfig


class Llama(Family):
    name = "Llama"
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    moe = False
    order = 50

    def config_to_hf(self, m: ModelConfig) -> dict[str, Any]:
        return {"intermediate_size": m.ffn_hidden, "attention_bias": m.attention_bias == "all", "mlp_bias": False}
