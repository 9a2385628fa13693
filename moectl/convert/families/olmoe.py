"""OLMoE (`OlmoeForCausalLM`): every layer MoE, RMSNorm over the whole query and key projections
(`qk_norm: projection`), optional q/k/v clipping and attention biases."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moectl.convert.families.base import ConfigReader, Family

if TYPE_CHECKING:
    from moectl.recipe.schema import ModelConfig


class Olmoe(Family):
    name = "OLMoE"
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    order = 40
    qk_norm = "projection"
    clips_qkv = True
    every_layer_moe = True
    aux_loss_default = 0.01

    def attention_misfits(self, m: ModelConfig) -> list[str]:
        why = super().attention_misfits(m)
        if m.head_dim is not None and m.head_dim * m.n_heads != m.d_model:
            why.append("a head_dim other than d_model / n_heads")
        return why

    def config_to_hf(self, m: ModelConfig) -> dict[str, Any]:
        e = m.moe
        return {"num_experts": e.num_experts, "norm_topk_prob": e.router.renormalize,
                "intermediate_size": e.expert_hidden, "clip_qkv": m.qkv_clip,
                "attention_bias": m.attention_bias == "all"}

    def model_from_hf(self, c: ConfigReader, model: dict[str, Any]) -> None:
        model["head_dim"] = None   # OLMoE's head size is always hidden_size / heads
        model["qkv_clip"] = c.get("clip_qkv", None, (int, float))

    def experts_from_hf(self, c: ConfigReader, model: dict[str, Any]) -> dict[str, Any]:
        return {"expert_hidden": model["ffn_hidden"]}
