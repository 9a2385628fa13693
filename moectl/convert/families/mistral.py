"""Mistral (`MistralForCausalLM`), dense, an upcycling source: Llama's layers without biases, any
head_dim. A sliding window imports when it covers every position of the model's context (Mistral
7B v0.2 and later have none); a binding one is refused, since moectl attends to the whole context.
Exported only for a model imported from Mistral: any other such model is written as Llama, which
computes the same."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moectl.convert.families.base import Family

if TYPE_CHECKING:
    from moectl.recipe.schema import ModelConfig


class Mistral(Family):
    name = "Mistral"
    model_type = "mistral"
    architecture = "MistralForCausalLM"
    moe = False
    order = 58
    attention_biases = ("none",)
    window_means_sliding = True

    def config_to_hf(self, m: ModelConfig) -> dict[str, Any]:
        return {"intermediate_size": m.ffn_hidden, "sliding_window": None}
