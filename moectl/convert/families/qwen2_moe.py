"""Qwen2-MoE (`Qwen2MoeForCausalLM`): one shared expert mixed by a sigmoid gate
(`shared_mix: sigmoid`), q/k/v biases or none, dense layers anywhere."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moectl.convert.families.base import (
    ConfigReader,
    Family,
    KeyMap,
    sparse_layers_from_hf,
    sparse_layers_to_hf,
)

if TYPE_CHECKING:
    from moectl.recipe.schema import ModelConfig, MoEConfig

MOE = "model.layers.{i}.mlp"


class Qwen2Moe(Family):
    name = "Qwen2-MoE"
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    order = 20
    keys = KeyMap(shared=(f"{MOE}.shared_expert.gate_proj.weight", f"{MOE}.shared_expert.up_proj.weight",
                          f"{MOE}.shared_expert.down_proj.weight"),
                  shared_gate=f"{MOE}.shared_expert_gate.weight")
    attention_biases = ("none", "qkv")

    def shared_misfits(self, e: MoEConfig) -> list[str]:
        if not e.shared_experts or e.shared_mix != "sigmoid":
            return ["no shared expert with a sigmoid gate (shared_mix: sigmoid)"]
        if e.shared_reduce == "mean" and e.shared_experts > 1:
            return ["averaged shared experts (shared_reduce: mean)"]
        return []

    def config_to_hf(self, m: ModelConfig) -> dict[str, Any]:
        e = m.moe
        return {"num_experts": e.num_experts, "norm_topk_prob": e.router.renormalize,
                "intermediate_size": m.ffn_hidden, "moe_intermediate_size": e.expert_hidden,
                **sparse_layers_to_hf(m), "use_sliding_window": False, "sliding_window": None,
                "shared_expert_intermediate_size": e.shared_experts * (e.shared_hidden or e.expert_hidden),
                "qkv_bias": m.attention_bias == "qkv"}

    def model_from_hf(self, c: ConfigReader, model: dict[str, Any]) -> None:
        model["attention_bias"] = "qkv" if c.get("qkv_bias", True) else "none"

    def experts_from_hf(self, c: ConfigReader, model: dict[str, Any]) -> dict[str, Any]:
        moe = {"expert_hidden": c.need("moe_intermediate_size"), "layers": sparse_layers_from_hf(c, model["n_layers"])}
        shared = c.get("shared_expert_intermediate_size", 0, int)
        if shared:
            moe.update(shared_experts=1, shared_hidden=shared, shared_mix="sigmoid")
        return moe
