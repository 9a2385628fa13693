"""Mistral (`MistralForCausalLM`), dense, an upcycling source: Llama's layers without biases, any
head_dim, and a sliding window in every layer (Mistral 7B v0.1's 4096; v0.2 and later have none).
A model without a window is written as Llama, which computes the same, unless it was imported
from Mistral."""

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
    windows = "all"

    def config_to_hf(self, m: ModelConfig) -> dict[str, Any]:
        return {"intermediate_size": m.ffn_hidden, **self.windows_to_hf(m)}
