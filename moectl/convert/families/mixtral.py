"""Mixtral (`MixtralForCausalLM`): every layer MoE, top-k softmax renormalised, no shared expert,
attention without biases or q/k normalisation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moectl.convert.families.base import ConfigReader, Family, KeyMap

if TYPE_CHECKING:
    from moectl.recipe.schema import ModelConfig

MOE = "model.layers.{i}.block_sparse_moe"


class Mixtral(Family):
    name = "Mixtral"
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    order = 10
    keys = KeyMap(router=f"{MOE}.gate.weight",
                  experts=(f"{MOE}.experts.{{e}}.w1.weight", f"{MOE}.experts.{{e}}.w3.weight",
                           f"{MOE}.experts.{{e}}.w2.weight"),
                  fused=(f"{MOE}.experts.gate_up_proj", f"{MOE}.experts.down_proj"),
                  renames=((".mlp.", ".block_sparse_moe."),))   # transformers v5 names the block `mlp` in memory
    attention_biases = ("none",)
    every_layer_moe = True
    rope_theta_default = 1e6
    window_means_sliding = True
    windows = "all"

    def router_misfits(self, router: Any) -> list[str]:
        why = super().router_misfits(router)
        if router.kind == "topk" and not router.renormalize:
            why.append("top-k weights not renormalised (Mixtral renormalises)")
        return why

    def config_to_hf(self, m: ModelConfig) -> dict[str, Any]:
        e = m.moe
        return {"intermediate_size": e.expert_hidden, "num_local_experts": e.num_experts,
                "router_jitter_noise": e.router.jitter_eps, "sliding_window": m.sliding_window}

    def renormalizes(self, c: ConfigReader) -> bool:
        return True

    def experts_from_hf(self, c: ConfigReader, model: dict[str, Any]) -> dict[str, Any]:
        return {"expert_hidden": model["ffn_hidden"]}
