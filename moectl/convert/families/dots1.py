"""dots1 (`Dots1ForCausalLM`): Qwen3's attention (RMSNorm of each query and key head) with
DeepSeek-V3's routed layer: sigmoid scores, a per-expert selection bias
(`e_score_correction_bias`), group-limited top-k, a routed scaling factor, and shared experts
summed with the routed output; the first layers may be dense. It is the native class for moectl
models routed that way: a sigmoid `topk` router (with aux-loss-free balancing or not: the bias is
written as it stands) and at least one shared expert."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moectl.convert.families.base import ConfigReader, Family, KeyMap

if TYPE_CHECKING:
    from moectl.recipe.schema import ModelConfig, MoEConfig

MOE = "model.layers.{i}.mlp"


class Dots1(Family):
    name = "dots1"
    model_type = "dots1"
    architecture = "Dots1ForCausalLM"
    order = 45
    qk_norm = "head"
    window_means_sliding = True   # dots1 has no use_sliding_window: its layer_types (or max_window_layers) say
    windows = "layers"
    keys = KeyMap(shared=(f"{MOE}.shared_experts.gate_proj.weight", f"{MOE}.shared_experts.up_proj.weight",
                          f"{MOE}.shared_experts.down_proj.weight"),
                  router_bias=f"{MOE}.gate.e_score_correction_bias")

    def misfits(self, m: ModelConfig) -> list[str]:
        why = super().misfits(m)
        if m.moe is not None:
            first = m.moe.layer_indices(m.n_layers)
            if first and first != list(range(first[0], m.n_layers)):
                why.append("dense layers after the first MoE layer (dots1 has dense layers first, then MoE)")
        return why

    def router_misfits(self, router: Any) -> list[str]:
        if router.kind != "topk":
            return [f"the {router.kind} router"]
        why = ["a router bias"] if router.gate_bias else []
        if router.score_func != "sigmoid":
            why.append("softmax router scores (dots1 routes by sigmoid scores)")
        if router.groups > 1 and router.group_score != "top2_sum":
            why.append(f"group_score {router.group_score} (dots1 scores a group by its two best experts)")
        return why

    def shared_misfits(self, e: MoEConfig) -> list[str]:
        width = e.shared_experts * (e.shared_hidden or e.expert_hidden)
        if not e.shared_experts:
            return ["no shared experts (dots1 always has them)"]
        if e.shared_mix != "add" or (e.shared_reduce == "mean" and e.shared_experts > 1):
            return [f"shared experts mixed by {e.shared_mix}/{e.shared_reduce} (dots1 adds their sum)"]
        if width % e.expert_hidden:
            return [f"a shared width of {width}, not a multiple of expert_hidden ({e.expert_hidden})"]
        return []

    def config_to_hf(self, m: ModelConfig) -> dict[str, Any]:
        e, r = m.moe, m.moe.router
        moe_layers = e.layer_indices(m.n_layers)
        return {"n_routed_experts": e.num_experts, "moe_intermediate_size": e.expert_hidden,
                "intermediate_size": m.ffn_hidden,
                "n_shared_experts": e.shared_experts * (e.shared_hidden or e.expert_hidden) // e.expert_hidden,
                "first_k_dense_replace": moe_layers[0], "n_group": r.groups, "topk_group": r.topk_groups,
                "norm_topk_prob": r.renormalize, "routed_scaling_factor": r.routed_scaling,
                "attention_bias": m.attention_bias == "all", **self.windows_to_hf(m)}

    def experts_from_hf(self, c: ConfigReader, model: dict[str, Any]) -> dict[str, Any]:
        hidden = c.need("moe_intermediate_size")
        shared = c.need("n_shared_experts")
        first = c.get("first_k_dense_replace", 0, int)
        if first >= model["n_layers"]:
            raise c.refuse(f"first_k_dense_replace is {first}: no layer of {model['n_layers']} is an MoE layer")
        return {"expert_hidden": hidden, "layers": "all", "first_dense": first, "shared_experts": shared,
                "shared_mix": "add",
                "router": {"kind": "topk", "score_func": "sigmoid", "selection_bias": True,
                           "renormalize": self.renormalizes(c), "groups": c.get("n_group", 1, int) or 1,
                           "topk_groups": c.get("topk_group", 1, int) or 1, "group_score": "top2_sum",
                           "routed_scaling": float(c.get("routed_scaling_factor", 1.0, (int, float)))}}
