"""GPT-OSS (`GptOssForCausalLM`): every layer MoE; attention with biases on all four projections,
a learned sink logit per head (`attention_sinks`), sliding windows in alternate layers and YaRN
RoPE; a top-k router with a logit bias whose softmax over the k best logits is moectl's softmax
renormalised over them; experts with biases and the clamped SwiGLU (`activation: swiglu_clamped`),
stored fused as gate_up_proj [E, d, 2F] with gate and up columns interleaved, and down_proj [E, F, d].
MXFP4-quantised expert weights (the published checkpoints' `*_blocks` / `*_scales`) are
dequantised on import (`dequantize_mxfp4`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from moectl.convert.families.base import ConfigReader, Family, KeyMap
from moectl.convert.hfio import Spec
from moectl.core.layers import CLAMP_ALPHA, CLAMP_LIMIT
from moectl.errors import MoectlError

if TYPE_CHECKING:
    from moectl.recipe.schema import ModelConfig, MoEConfig

EXPERTS = "model.layers.{i}.mlp.experts"
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MXFP4 (OCP microscaling): `blocks` [..., G, 16] uint8 hold two e2m1 values per byte (low
    nibble first), `scales` [..., G] uint8 a power-of-two exponent per group of 32 (bias 127).
    Returns [..., G * 32] in `dtype`."""
    table = torch.tensor(FP4_VALUES, dtype=torch.float32)
    low, high = (blocks & 0x0F).long(), (blocks >> 4).long()
    values = torch.stack([table[low], table[high]], dim=-1).flatten(-2)          # [..., G, 32]
    exponents = scales.to(torch.int32) - 127
    out = torch.ldexp(values, exponents.unsqueeze(-1))
    return out.flatten(-2).to(dtype)


class GptOss(Family):
    name = "GPT-OSS"
    model_type = "gpt_oss"
    architecture = "GptOssForCausalLM"
    order = 35
    every_layer_moe = True
    attention_biases = ("all",)
    windows = "layers"
    window_means_sliding = True   # no use_sliding_window key: a window is on, in the layers layer_types names
    expert_biases = True
    keys = KeyMap(router="model.layers.{i}.mlp.router.weight", gate_bias="model.layers.{i}.mlp.router.bias",
                  sinks="model.layers.{i}.self_attn.sinks")

    def misfits(self, m: ModelConfig) -> list[str]:
        why = [w for w in super().misfits(m) if not w.startswith("activation ")]
        if m.activation != "swiglu_clamped":
            why.append(f"activation {m.activation} (GPT-OSS uses the clamped SwiGLU, swiglu_clamped)")
        if not m.attention_sinks:
            why.append("no attention sinks (GPT-OSS has them)")
        if m.moe is not None and not m.moe.expert_bias:
            why.append("no expert biases (GPT-OSS has them)")
        return why

    def router_misfits(self, router: Any) -> list[str]:
        if router.kind != "topk":
            return [f"the {router.kind} router"]
        why = []
        if router.score_func != "softmax" or not router.renormalize:
            why.append("router weights other than a softmax renormalised over the k experts")
        if not router.gate_bias:
            why.append("no router bias (GPT-OSS has one)")
        if router.bias_update_rate > 0 or router.selection_bias or router.groups > 1 or router.routed_scaling != 1:
            why.append("a selection bias, groups or a routing scale")
        return why

    def config_to_hf(self, m: ModelConfig) -> dict[str, Any]:
        return {"num_local_experts": m.moe.num_experts, "intermediate_size": m.moe.expert_hidden,
                "attention_bias": True, "swiglu_alpha": CLAMP_ALPHA, "swiglu_limit": CLAMP_LIMIT,
                **{k: v for k, v in self.windows_to_hf(m).items() if k in ("sliding_window", "layer_types")},
                # transformers builds GPT-OSS's window mask whatever the layers: a window that never binds
                **({"sliding_window": m.seq_len} if m.sliding_window is None else {})}

    def model_from_hf(self, c: ConfigReader, model: dict[str, Any]) -> None:
        alpha = c.get("swiglu_alpha", CLAMP_ALPHA, (int, float))
        limit = c.get("swiglu_limit", CLAMP_LIMIT, (int, float))
        if (alpha, limit) != (CLAMP_ALPHA, CLAMP_LIMIT):
            raise c.refuse(f"swiglu_alpha {alpha} / swiglu_limit {limit} (moectl's clamped SwiGLU is GPT-OSS's "
                           f"{CLAMP_ALPHA} / {CLAMP_LIMIT})")
        if not c.get("attention_bias", True):
            raise c.refuse("attention_bias is false (moectl maps GPT-OSS with biases on every projection)")
        model.update(activation="swiglu_clamped", attention_bias="all", attention_sinks=True)

    def windows_from_hf(self, c: ConfigReader, max_pos: int, n_layers: int):
        if c.get("sliding_window") is not None and c.get("layer_types") is None:   # transformers' default alternation
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
            c = ConfigReader({**c.cfg, "layer_types": types}, c.where)
        return super().windows_from_hf(c, max_pos, n_layers)

    def experts_from_hf(self, c: ConfigReader, model: dict[str, Any]) -> dict[str, Any]:
        return {"expert_hidden": c.need("intermediate_size"), "layers": "all", "expert_bias": True,
                "router": {"kind": "topk", "renormalize": True, "gate_bias": True}}

    def renormalizes(self, c: ConfigReader) -> bool:
        return True

    # ----------------------------------------------------------------- experts: fused, interleaved

    def experts_from_hf_plan(self, hf, get, lay, i: int, out: dict, used: set[str], where: str) -> None:
        base = EXPERTS.format(i=i)
        fused = {k: f"{base}.{k}" for k in ("gate_up_proj", "down_proj")}
        biases = {k: f"{base}.{k}_bias" for k in ("gate_up_proj", "down_proj")}
        matrices = {k: self._mxfp4(hf, base, k, where, used) if f"{base}.{k}_blocks" in hf
                    else ((hf.spec(name), lambda name=name: get(name)) if name in hf else None)
                    for k, name in fused.items()}
        if None in matrices.values() or not all(b in hf for b in biases.values()):
            return   # reported as missing by the completeness check
        (gu, gate_up), (dn, down) = matrices["gate_up_proj"], matrices["down_proj"]
        gub = hf.spec(biases["gate_up_proj"])
        E, D, F2 = gu.shape
        p = f"layers.{i}.mlp.moe.experts."
        for w, b, cols in (("w1", "b1", slice(0, None, 2)), ("w3", "b3", slice(1, None, 2))):
            out[p + w] = (Spec(gu.dtype, (E, D, F2 // 2)), lambda cols=cols: gate_up()[:, :, cols].contiguous())
            out[p + b] = (Spec(gub.dtype, (E, F2 // 2)),
                          lambda cols=cols: get(biases["gate_up_proj"])[:, cols].contiguous())
        out[p + "w2"] = (dn, lambda: down().contiguous())
        out[p + "b2"] = (hf.spec(biases["down_proj"]), lambda: get(biases["down_proj"]).contiguous())
        used.update(n for n in (*fused.values(), *biases.values()) if n in hf)

    def _mxfp4(self, hf, base: str, key: str, where: str, used: set[str]):
        """(Spec, make) of an MXFP4-quantised expert matrix of the published checkpoints (blocks
        [E, out, G, 16] and scales [E, out, G]), dequantised to bf16 as [E, in, out]."""
        blocks, scales = f"{base}.{key}_blocks", f"{base}.{key}_scales"
        if scales not in hf:
            raise MoectlError(f"{where}: {blocks} has no {key}_scales beside it",
                              hint="the checkpoint is damaged; download it again")
        E, rows, G = hf.spec(blocks).shape[:3]
        if hf.spec(scales).shape != (E, rows, G):
            raise MoectlError(f"{where}: {scales} is {list(hf.spec(scales).shape)}, not [{E}, {rows}, {G}] as its "
                              "blocks imply", hint="the checkpoint is damaged; download it again")
        used.update((blocks, scales))
        return (Spec(torch.bfloat16, (E, G * 32, rows)),
                lambda: dequantize_mxfp4(hf.get(blocks), hf.get(scales)).transpose(1, 2).contiguous())

    def experts_to_hf(self, src, get, lay, i: int, out: dict) -> None:
        p, base = f"layers.{i}.mlp.moe.experts.", EXPERTS.format(i=i)
        w1, b1 = src.spec(p + "w1"), src.spec(p + "b1")
        E, D, F = w1.shape
        out[f"{base}.gate_up_proj"] = (Spec(w1.dtype, (E, D, 2 * F)), lambda: torch.stack(
            [get(p + "w1"), src.get(p + "w3")], dim=-1).reshape(E, D, 2 * F))
        out[f"{base}.gate_up_proj_bias"] = (Spec(b1.dtype, (E, 2 * F)), lambda: torch.stack(
            [src.get(p + "b1"), src.get(p + "b3")], dim=-1).reshape(E, 2 * F))
        out[f"{base}.down_proj"] = (src.spec(p + "w2"), lambda: src.get(p + "w2"))
        out[f"{base}.down_proj_bias"] = (src.spec(p + "b2"), lambda: src.get(p + "b2"))

    def shared_misfits(self, e: MoEConfig) -> list[str]:
        return ["shared experts"] if e.shared_experts else []
