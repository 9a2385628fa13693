"""Qwen2 (`Qwen2ForCausalLM`), the dense one and an upcycling source: Llama's layers with biases on
the query, key and value projections (always; `attention_bias: qkv`) and none on the output."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moectl.convert.families.base import ConfigReader, Family

if TYPE_CHECKING:
    from moectl.recipe.schema import ModelConfig


class Qwen2(Family):
    name = "Qwen2"
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    moe = False
    order = 55
    attention_biases = ("qkv",)

    windows = "layers"

    def config_to_hf(self, m: ModelConfig) -> dict[str, Any]:
        return {"intermediate_size": m.ffn_hidden, **self.windows_to_hf(m)}

    def model_from_hf(self, c: ConfigReader, model: dict[str, Any]) -> None:
        model["attention_bias"] = "qkv"
