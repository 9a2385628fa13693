"""DeepSeek-V2 (`DeepseekV2ForCausalLM`; V2-Lite and V2.5 too): DeepSeek-V3's latent attention (its
RoPE on interleaved pairs, moectl's layout) with a softmax router: the top-k raw probabilities
("greedy") or, with `topk_method: group_limited_greedy`, the top-k among the topk_group groups
whose best expert scores highest (`group_score: max`), times a routed scaling factor; shared
experts and dense first layers; no selection bias."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moectl.convert.families.base import ConfigReader, KeyMap
from moectl.convert.families.deepseek_v3 import DeepseekV3

if TYPE_CHECKING:
    from moectl.recipe.schema import ModelConfig

MOE = "model.layers.{i}.mlp"


class DeepseekV2(DeepseekV3):
    name = "DeepSeek-V2"
    model_type = "deepseek_v2"
    architecture = "DeepseekV2ForCausalLM"
    order = 43
    keys = KeyMap(shared=(f"{MOE}.shared_experts.gate_proj.weight", f"{MOE}.shared_experts.up_proj.weight",
                          f"{MOE}.shared_experts.down_proj.weight"))

    def router_misfits(self, router: Any) -> list[str]:
        if router.kind != "topk":
            return [f"the {router.kind} router"]
        why = []
        if router.score_func != "softmax" or router.renormalize:
            why.append("router weights other than raw softmax probabilities (DeepSeek-V2 does not renormalise)")
        if router.bias_update_rate > 0 or router.selection_bias or router.gate_bias:
            why.append("a selection or router bias")
        if router.groups > 1 and router.group_score != "max":
            why.append(f"group_score {router.group_score} (DeepSeek-V2 scores a group by its best expert)")
        return why

    def config_to_hf(self, m: ModelConfig) -> dict[str, Any]:
        cfg = super().config_to_hf(m)
        r = m.moe.router
        for key in ("topk_method", "scoring_func", "rope_interleave", "norm_topk_prob"):
            cfg.pop(key, None)
        grouped = r.groups > 1
        cfg.update(topk_method="group_limited_greedy" if grouped else "greedy",
                   n_group=r.groups if grouped else None, topk_group=r.topk_groups if grouped else None)
        return cfg

    def model_from_hf(self, c: ConfigReader, model: dict[str, Any]) -> None:
        method = c.get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise c.refuse(f"topk_method {method!r} (moectl maps greedy and group_limited_greedy)")
        inner = ConfigReader({**c.cfg, "topk_method": "noaux_tc", "scoring_func": "sigmoid"}, c.where)
        super().model_from_hf(inner, model)

    def experts_from_hf(self, c: ConfigReader, model: dict[str, Any]) -> dict[str, Any]:
        moe = super().experts_from_hf(c, model)
        grouped = c.get("topk_method", "greedy") == "group_limited_greedy"
        moe["router"] = {"kind": "topk", "score_func": "softmax", "renormalize": False,
                         "groups": (c.get("n_group", 1, int) or 1) if grouped else 1,
                         "topk_groups": (c.get("topk_group", 1, int) or 1) if grouped else 1, "group_score": "max",
                         "routed_scaling": float(c.get("routed_scaling_factor", 1.0, (int, float)))}
        return moe
