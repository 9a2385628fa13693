"""DeepSeek-V3 (`DeepseekV3ForCausalLM`; Kimi K2 and Moonlight share it): multi-head latent attention
(`model.latent_attention`, with DeepSeek's interleaved RoPE layout, `rope_interleave: true`, which is
moectl's own) and dots1's routed layer: sigmoid scores, a selection bias (`e_score_correction_bias`),
group-limited top-k, a routed scaling factor, shared experts and dense first layers; YaRN with
DeepSeek's mscale pair, whose mscale_all_dim also scales the attention softmax."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moectl.convert.families.base import LAYER_KEYS, ConfigReader, Layout
from moectl.convert.families.dots1 import Dots1

if TYPE_CHECKING:
    from moectl.recipe.schema import ModelConfig

ATTN = "model.layers.{i}.self_attn"


class DeepseekV3(Dots1):
    name = "DeepSeek-V3"
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    order = 44
    qk_norm = "none"
    window_means_sliding = False
    windows = "none"
    attention_biases = ("none", "all")
    latent = True

    def misfits(self, m: ModelConfig) -> list[str]:
        why = super().misfits(m)
        if m.latent_attention is None:
            why.append("standard attention (DeepSeek-V3 uses latent attention)")
        return why

    def attention_keys(self, lay: Layout) -> list[tuple[str, str, str]]:
        norms = [t for t in LAYER_KEYS if "norm" in t[0]]
        q = ([("layers.{i}.attn.wq.weight", f"{ATTN}.q_proj.weight", "copy")] if not lay.q_rank else
             [("layers.{i}.attn.wq_a.weight", f"{ATTN}.q_a_proj.weight", "copy"),
              ("layers.{i}.attn.wq_a.bias", f"{ATTN}.q_a_proj.bias", "copy"),
              ("layers.{i}.attn.q_norm.weight", f"{ATTN}.q_a_layernorm.weight", "copy"),
              ("layers.{i}.attn.wq_b.weight", f"{ATTN}.q_b_proj.weight", "copy")])
        kv = [("layers.{i}.attn.wkv_a.weight", f"{ATTN}.kv_a_proj_with_mqa.weight", "copy"),
              ("layers.{i}.attn.wkv_a.bias", f"{ATTN}.kv_a_proj_with_mqa.bias", "copy"),
              ("layers.{i}.attn.kv_norm.weight", f"{ATTN}.kv_a_layernorm.weight", "copy"),
              ("layers.{i}.attn.wkv_b.weight", f"{ATTN}.kv_b_proj.weight", "copy"),
              ("layers.{i}.attn.wo.weight", f"{ATTN}.o_proj.weight", "copy"),
              ("layers.{i}.attn.wo.bias", f"{ATTN}.o_proj.bias", "copy")]
        return norms + q + kv

    def config_to_hf(self, m: ModelConfig) -> dict[str, Any]:
        la = m.latent_attention
        cfg = super().config_to_hf(m)
        for key in ("sliding_window", "max_window_layers", "layer_types", "use_sliding_window"):
            cfg.pop(key, None)
        cfg.update(q_lora_rank=la.q_rank, kv_lora_rank=la.kv_rank, qk_nope_head_dim=la.nope_dim,
                   qk_rope_head_dim=la.rope_dim, v_head_dim=la.v_dim, head_dim=la.rope_dim, rope_interleave=True,
                   num_key_value_heads=m.n_heads, topk_method="noaux_tc", scoring_func="sigmoid")
        return cfg

    def model_from_hf(self, c: ConfigReader, model: dict[str, Any]) -> None:
        if not c.get("rope_interleave", True):
            raise c.refuse("rope_interleave is false (moectl maps DeepSeek's own interleaved RoPE layout)")
        if c.get("topk_method", "noaux_tc") != "noaux_tc" or c.get("scoring_func", "sigmoid") != "sigmoid":
            raise c.refuse(f"topk_method {c.get('topk_method')!r} / scoring_func {c.get('scoring_func')!r} (moectl "
                           "maps DeepSeek-V3's noaux_tc with sigmoid scores)")
        model.update(head_dim=None, n_kv_heads=None, qk_norm="none",
                     latent_attention={"q_rank": c.get("q_lora_rank", None, int), "kv_rank": c.need("kv_lora_rank"),
                                       "nope_dim": c.need("qk_nope_head_dim"), "rope_dim": c.need("qk_rope_head_dim"),
                                       "v_dim": c.need("v_head_dim")})
