"""The Hugging Face model families moectl converts natively, each in both directions.

A family knows three things: which moectl models it can represent exactly (`misfits`), how its
config.json maps to a recipe's model section and back, and the names of its tensors. Tensors are
renamed, transposed and (for RoPE) reordered, never recomputed, so a round trip is bit for bit.

RoPE layouts: moectl rotates interleaved pairs (x[2i], x[2i+1]); the Hugging Face families rotate
halves (x[i], x[i + d/2]). The rows of the query and key projections (and of their biases and
q/k-norm weights) are reordered per head on the way through, which leaves every attention score
unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moectl.errors import MoectlError

if TYPE_CHECKING:
    from torch import Tensor

    from moectl.recipe.schema import ModelConfig

CONVERT_HINT = "see docs/convert.md for what each family supports"


@dataclass(frozen=True)
class Family:
    name: str             # what docs and messages call it
    model_type: str       # config.json's model_type
    architecture: str     # the transformers class
    moe: bool
    moe_prefix: str = "mlp"                                   # the MoE block's module name
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")   # w1, w3, w2

    @property
    def expert_keys(self) -> tuple[str, str, str]:
        return self.expert_names


LLAMA = Family("Llama", "llama", "LlamaForCausalLM", moe=False)
MIXTRAL = Family("Mixtral", "mixtral", "MixtralForCausalLM", moe=True, moe_prefix="block_sparse_moe",
                 expert_names=("w1", "w3", "w2"))
QWEN2_MOE = Family("Qwen2-MoE", "qwen2_moe", "Qwen2MoeForCausalLM", moe=True)
QWEN3_MOE = Family("Qwen3-MoE", "qwen3_moe", "Qwen3MoeForCausalLM", moe=True)
OLMOE = Family("OLMoE", "olmoe", "OlmoeForCausalLM", moe=True)
FAMILIES = {f.model_type: f for f in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, LLAMA)}


# --------------------------------------------------------------------------- moectl -> family


def misfits(family: Family, m: ModelConfig) -> list[str]:
    """Why the family's transformers class cannot compute this model exactly (empty: it can)."""
    why = []
    if m.activation != "swiglu":
        why.append(f"activation {m.activation} (the family uses SwiGLU)")
    if (m.moe is not None) != family.moe:
        why.append("a dense model" if m.moe is None else "an MoE model")
    if m.qkv_clip is not None and family is not OLMOE:
        why.append("qkv_clip")
    want_norm = {QWEN3_MOE: "head", OLMOE: "projection"}.get(family, "none")
    if m.qk_norm != want_norm:
        why.append(f"qk_norm {m.qk_norm} (the family has {want_norm})")
    bias_ok = {QWEN2_MOE: ("none", "qkv"), MIXTRAL: ("none",)}.get(family, ("none", "all"))
    if m.attention_bias not in bias_ok:
        why.append(f"attention_bias {m.attention_bias}")
    if family is OLMOE and m.head_dim is not None and m.head_dim * m.n_heads != m.d_model:
        why.append("a head_dim other than d_model / n_heads")
    if m.ffn_hidden == 0 and (m.moe is None or m.moe.layer_indices(m.n_layers) != list(range(m.n_layers))):
        why.append("attention-only dense layers (ffn_hidden 0)")
    if m.moe is None or not family.moe:
        return why
    e = m.moe
    if e.router.kind != "topk":
        why.append(f"the {e.router.kind} router")
    else:
        if e.router.score_func != "softmax":
            why.append("sigmoid router scores")
        if e.router.bias_update_rate > 0:
            why.append("aux-loss-free selection biases")
        if family is MIXTRAL and not e.router.renormalize:
            why.append("top-k weights not renormalised (Mixtral renormalises)")
    if e.block.kind != "standard":
        why.append(f"the {e.block.kind} block")
    from moectl.recipe.parts import variant_fields

    for name in variant_fields():
        if getattr(e, name) is not None:
            why.append(f"the {name} variant")
    if family is QWEN2_MOE:
        if not e.shared_experts or e.shared_mix != "sigmoid":
            why.append("no shared expert with a sigmoid gate (shared_mix: sigmoid)")
        elif e.shared_reduce == "mean" and e.shared_experts > 1:
            why.append("averaged shared experts (shared_reduce: mean)")
    elif e.shared_experts:
        why.append("shared experts")
    if family in (MIXTRAL, OLMOE) and e.layer_indices(m.n_layers) != list(range(m.n_layers)):
        why.append("dense layers between MoE layers")
    return why


def native_family(m: ModelConfig) -> tuple[Family | None, dict[str, list[str]]]:
    """The first family that fits the model exactly, and why each other one does not."""
    reasons = {}
    for family in FAMILIES.values():
        why = misfits(family, m)
        if not why:
            return family, reasons
        reasons[family.name] = why
    return None, reasons


def hf_config(family: Family, m: ModelConfig) -> dict[str, Any]:
    """The family's config.json fields for a moectl model section."""
    head_dim = m.head_dim or m.d_model // m.n_heads
    cfg: dict[str, Any] = {
        "architectures": [family.architecture], "model_type": family.model_type,
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads or m.n_heads, "head_dim": head_dim,
        "hidden_act": "silu", "max_position_embeddings": m.seq_len, "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta, "rope_parameters": _rope_parameters(m),
        "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std, "attention_dropout": 0.0,
        "use_cache": True,
    }
    if m.rope_scaling is not None:   # transformers v4 reads rope_scaling, v5 rope_parameters
        cfg["rope_scaling"] = {k: v for k, v in cfg["rope_parameters"].items() if k != "rope_theta"}
    if family is LLAMA:
        cfg.update(intermediate_size=m.ffn_hidden, attention_bias=m.attention_bias == "all", mlp_bias=False)
        return cfg
    e = m.moe
    common = {"num_experts_per_tok": e.top_k, "router_aux_loss_coef": e.aux_loss_weight,
              "output_router_logits": False}
    if family is MIXTRAL:
        cfg.update(common, intermediate_size=e.expert_hidden, num_local_experts=e.num_experts,
                   router_jitter_noise=e.router.jitter_eps, sliding_window=None)
        return cfg
    moe_layers = set(e.layer_indices(m.n_layers))
    cfg.update(common, num_experts=e.num_experts, norm_topk_prob=e.router.renormalize)
    if family is OLMOE:
        cfg.update(intermediate_size=e.expert_hidden, clip_qkv=m.qkv_clip, attention_bias=m.attention_bias == "all")
        return cfg
    cfg.update(intermediate_size=m.ffn_hidden, moe_intermediate_size=e.expert_hidden, decoder_sparse_step=1,
               mlp_only_layers=[i for i in range(m.n_layers) if i not in moe_layers], use_sliding_window=False,
               sliding_window=None)
    if family is QWEN2_MOE:
        cfg.update(shared_expert_intermediate_size=e.shared_experts * (e.shared_hidden or e.expert_hidden),
                   qkv_bias=m.attention_bias == "qkv")
    else:
        cfg.update(attention_bias=m.attention_bias == "all")
    return cfg


def _rope_parameters(m: ModelConfig) -> dict[str, Any]:
    rs = m.rope_scaling
    if rs is None:
        return {"rope_type": "default", "rope_theta": m.rope_theta}
    out: dict[str, Any] = {"rope_type": rs.kind, "rope_theta": m.rope_theta, "factor": rs.factor}
    if rs.kind == "llama3":
        out.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                   original_max_position_embeddings=rs.original_context)
    return out


def _rope_scaling(rope: dict[str, Any], c: _Config) -> dict[str, Any] | None:
    """A recipe's model.rope_scaling from a config's rope_parameters (or legacy rope_scaling)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind not in ("linear", "llama3"):
        raise c.refuse(f"RoPE scaling {kind!r} (moectl implements linear and llama3)")
    factor = rope.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool):
        raise MoectlError(f"{c.where}: the {kind} RoPE scaling has no numeric factor", hint="the config.json is damaged")
    out: dict[str, Any] = {"kind": kind, "factor": float(factor)}
    if kind == "llama3":
        try:
            out.update(low_freq_factor=float(rope["low_freq_factor"]), high_freq_factor=float(rope["high_freq_factor"]),
                       original_context=int(rope["original_max_position_embeddings"]))
        except (KeyError, TypeError, ValueError):
            raise MoectlError(f"{c.where}: the llama3 RoPE scaling lacks low_freq_factor, high_freq_factor or "
                              "original_max_position_embeddings", hint="the config.json is damaged") from None
    return out


# --------------------------------------------------------------------------- family -> moectl


def family_of(cfg: dict[str, Any], where: str) -> Family:
    model_type = cfg.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    arch = (cfg.get("architectures") or ["?"])[0] if isinstance(cfg.get("architectures"), list) else "?"
    known = ", ".join(f"{f.name} ({f.model_type})" for f in FAMILIES.values())
    raise MoectlError(f"{where}: model_type {model_type!r} ({arch}) is not a family moectl converts",
                      hint=f"moectl imports {known}, and folders it exported itself; {CONVERT_HINT}")


class _Config:
    """config.json values with the family class's defaults, and clear errors for bad ones."""

    def __init__(self, cfg: dict[str, Any], where: str):
        self.cfg, self.where = cfg, where

    def get(self, key: str, default: Any = None, kind: type | tuple[type, ...] | None = None) -> Any:
        value = self.cfg.get(key, default)
        if value is None:
            value = default
        if kind is not None and value is not None and (not isinstance(value, kind) or isinstance(value, bool)
                                                       and kind in (int, float, (int, float))):
            raise MoectlError(f"{self.where}: {key} is {value!r}, not a {getattr(kind, '__name__', 'number')}",
                              hint="the config.json is damaged")
        return value

    def need(self, key: str, kind: type | tuple[type, ...] = int) -> Any:
        if self.cfg.get(key) is None:
            raise MoectlError(f"{self.where}: config.json has no {key}", hint="the config.json is incomplete")
        return self.get(key, kind=kind)

    def refuse(self, what: str) -> MoectlError:
        return MoectlError(f"{self.where}: {what}, which moectl's engine does not implement", hint=CONVERT_HINT)


def model_section(family: Family, raw: dict[str, Any], where: str) -> dict[str, Any]:
    """A recipe's model section (plain data, validated later) from a family's config.json."""
    c = _Config(raw, where)
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise c.refuse(f"hidden_act is {act!r} (moectl's SwiGLU is silu)")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise MoectlError(f"{where}: rope_parameters is {rope!r}", hint="the config.json is damaged")
    scaling = _rope_scaling(rope, c)
    theta = c.get("rope_theta", rope.get("rope_theta", 1e6 if family is MIXTRAL else 1e4), (int, float))
    d, heads = c.need("hidden_size"), c.need("num_attention_heads")
    head_dim = c.get("head_dim", None, int)
    kv = c.get("num_key_value_heads", heads, int)
    n_layers = c.need("num_hidden_layers")
    inter = c.need("intermediate_size")
    if c.get("mlp_bias", False):
        raise c.refuse("mlp_bias is true (biases on the feed-forward projections)")
    if c.get("pretraining_tp", 1, int) != 1:
        raise c.refuse("pretraining_tp is not 1")
    window = c.get("sliding_window")
    max_pos = c.get("max_position_embeddings", 2048, int)
    sliding = c.get("use_sliding_window", window is not None and family is MIXTRAL)
    if sliding and window is not None and window < max_pos:
        raise c.refuse(f"sliding-window attention ({window} < {max_pos} positions)")
    model: dict[str, Any] = {
        "vocab_size": c.need("vocab_size"), "d_model": d, "n_layers": n_layers, "n_heads": heads,
        "n_kv_heads": kv if kv != heads else None, "ffn_hidden": inter, "activation": "swiglu", "seq_len": max_pos,
        "rope_theta": float(theta), "rope_scaling": scaling, "norm_eps": float(c.get("rms_norm_eps", 1e-6, (int, float))),
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
        "init_std": float(c.get("initializer_range", 0.02, (int, float))),
        "head_dim": head_dim if head_dim is not None and head_dim * heads != d else None,
        "attention_bias": "all" if c.get("attention_bias", False) else "none",
        "qk_norm": {QWEN3_MOE: "head", OLMOE: "projection"}.get(family, "none"),
    }
    if family is OLMOE:
        model["head_dim"] = None   # OLMoE's head size is always hidden_size / heads
        model["qkv_clip"] = c.get("clip_qkv", None, (int, float))
    if family is QWEN2_MOE:
        model["attention_bias"] = "qkv" if c.get("qkv_bias", True) else "none"
    if family is LLAMA:
        return model
    # transformers v5 writes num_local_experts for every family; published configs say num_experts
    experts = c.need("num_experts" if c.get("num_experts") is not None else "num_local_experts")
    moe: dict[str, Any] = {
        "num_experts": experts, "top_k": c.need("num_experts_per_tok"),
        "aux_loss_weight": float(c.get("router_aux_loss_coef", 0.001 if family is not OLMOE else 0.01, (int, float))),
        "z_loss_weight": 0.0, "layers": "all",
        "router": {"kind": "topk", "renormalize": True if family is MIXTRAL else bool(c.get("norm_topk_prob", False)),
                   "jitter_eps": float(c.get("router_jitter_noise", 0.0, (int, float)))},
    }
    if family in (MIXTRAL, OLMOE):
        moe["expert_hidden"] = inter
    else:
        moe["expert_hidden"] = c.need("moe_intermediate_size")
        step = c.get("decoder_sparse_step", 1, int)
        only = c.get("mlp_only_layers", [], list)
        layers = [i for i in range(n_layers) if i not in only and step > 0 and (i + 1) % step == 0]
        if not layers:
            raise MoectlError(f"{where}: no layer is an MoE layer (decoder_sparse_step {step}, mlp_only_layers "
                              f"{only})", hint="import it as a dense model instead: it is not a family moectl maps")
        moe["layers"] = "all" if layers == list(range(n_layers)) else layers
    if family is QWEN2_MOE:
        shared = c.get("shared_expert_intermediate_size", 0, int)
        if shared:
            moe.update(shared_experts=1, shared_hidden=shared, shared_mix="sigmoid")
    model["moe"] = moe
    return model


# --------------------------------------------------------------------------- tensors


@dataclass
class Layout:
    """What the tensor names and reorderings of one model depend on."""

    family: Family
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    qk_norm: str
    moe_layers: frozenset[int]
    num_experts: int
    tied: bool

    @classmethod
    def of(cls, family: Family, m: ModelConfig) -> Layout:
        moe_layers = frozenset(m.moe.layer_indices(m.n_layers)) if m.moe is not None else frozenset()
        return cls(family, m.n_layers, m.n_heads, m.n_kv_heads or m.n_heads, m.head_dim or m.d_model // m.n_heads,
                   m.qk_norm, moe_layers, m.moe.num_experts if m.moe is not None else 0, m.tie_embeddings)


def _rope_order(head_dim: int, to_hf: bool):
    import torch

    half = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])   # hf[j] = moectl[half[j]]
    return half if to_hf else torch.argsort(half)


def _reorder(t: Tensor, heads: int, head_dim: int, to_hf: bool) -> Tensor:
    """Reorder the first dimension of a per-head tensor (rows of q/k, their biases or norms)."""
    order = _rope_order(head_dim, to_hf)
    shape = t.shape
    return t.reshape(heads, head_dim, *shape[1:])[:, order].reshape(shape).contiguous()


def _pairs(lay: Layout) -> list[tuple[str, str, str]]:
    """(moectl name, family name, how) for every one-to-one tensor; `how` is copy, q, k (RoPE rows)
    or qn, kn (q/k-norm weights)."""
    out = [("embed.weight", "model.embed_tokens.weight", "copy"), ("norm.weight", "model.norm.weight", "copy")]
    if not lay.tied:
        out.append(("head.weight", "lm_head.weight", "copy"))
    f = lay.family
    for i in range(lay.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        out += [(m + "attn_norm.weight", h + "input_layernorm.weight", "copy"),
                (m + "mlp.norm.weight", h + "post_attention_layernorm.weight", "copy")]
        for ours, theirs, how in (("wq", "q_proj", "q"), ("wk", "k_proj", "k"), ("wv", "v_proj", "copy"),
                                  ("wo", "o_proj", "copy")):
            out += [(f"{m}attn.{ours}.weight", f"{h}self_attn.{theirs}.weight", how),
                    (f"{m}attn.{ours}.bias", f"{h}self_attn.{theirs}.bias", how)]
        if lay.qk_norm != "none":
            out += [(m + "attn.q_norm.weight", h + "self_attn.q_norm.weight", "qn"),
                    (m + "attn.k_norm.weight", h + "self_attn.k_norm.weight", "kn")]
        if i not in lay.moe_layers:
            for ours, theirs in zip(("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"), strict=True):
                out.append((f"{m}mlp.ffn.{ours}.weight", f"{h}mlp.{theirs}.weight", "copy"))
            continue
        p = f"{h}{f.moe_prefix}."
        out.append((m + "mlp.moe.router.weight", p + "gate.weight", "copy"))
        for ours, theirs in zip(("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"), strict=True):
            out.append((f"{m}mlp.moe.shared.{ours}.weight", f"{p}shared_expert.{theirs}.weight", "copy"))
        out.append((m + "mlp.moe.shared_gate.weight", p + "shared_expert_gate.weight", "copy"))
    return out


def _transform(t: Tensor, how: str, lay: Layout, to_hf: bool) -> Tensor:
    if how == "copy":
        return t
    heads = lay.n_heads if how in ("q", "qn") else lay.n_kv_heads
    if how in ("qn", "kn") and lay.qk_norm == "head":
        heads = 1
    return _reorder(t, heads, lay.head_dim, to_hf)


def to_hf_state(state: dict[str, Tensor], lay: Layout) -> dict[str, Tensor]:
    """A moectl state dict in the family's on-disk layout (one tensor per expert matrix, as the
    families' published checkpoints and transformers' save_pretrained write them)."""
    out = {}
    for ours, theirs, how in _pairs(lay):
        if ours in state:
            out[theirs] = _transform(state[ours], how, lay, to_hf=True)
    f = lay.family
    for i in sorted(lay.moe_layers):
        for ours, theirs in zip(("w1", "w3", "w2"), f.expert_keys, strict=True):
            stacked = state[f"layers.{i}.mlp.moe.experts.{ours}"]
            for e in range(stacked.shape[0]):
                out[f"model.layers.{i}.{f.moe_prefix}.experts.{e}.{theirs}.weight"] = stacked[e].t().contiguous()
    return out


def from_hf_state(hf: dict[str, Tensor], lay: Layout, expected: dict[str, tuple[int, ...]], where: str
                  ) -> dict[str, Tensor]:
    """A moectl state dict from the family's tensors: per-expert or fused (transformers v5's
    gate_up_proj / down_proj) expert layouts alike. `expected` holds the moectl model's tensor
    shapes; anything missing, left over or of another shape is an error naming the tensors."""
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    if lay.family.moe_prefix != "mlp":   # transformers v5 names Mixtral's block `mlp` in memory
        hf = {k.replace(".mlp.", f".{lay.family.moe_prefix}.", 1): v for k, v in hf.items()}
    used: set[str] = set()
    out: dict[str, Tensor] = {}
    for ours, theirs, how in _pairs(lay):
        if ours in expected and theirs in hf:
            out[ours] = _transform(hf[theirs], how, lay, to_hf=False)
            used.add(theirs)
    if lay.tied and "lm_head.weight" in hf:
        used.add("lm_head.weight")   # a tied head saved anyway
    f = lay.family
    for i in sorted(lay.moe_layers):
        p = f"model.layers.{i}.{f.moe_prefix}.experts."
        fused_in, fused_out = p + "gate_up_proj", p + "down_proj"
        if fused_in in hf and fused_out in hf:
            gate_up, down = hf[fused_in], hf[fused_out]           # [E, 2F, D], [E, D, F]
            width = gate_up.shape[1] // 2
            out[f"layers.{i}.mlp.moe.experts.w1"] = gate_up[:, :width].transpose(1, 2).contiguous()
            out[f"layers.{i}.mlp.moe.experts.w3"] = gate_up[:, width:].transpose(1, 2).contiguous()
            out[f"layers.{i}.mlp.moe.experts.w2"] = down.transpose(1, 2).contiguous()
            used.update((fused_in, fused_out))
            continue
        for ours, theirs in zip(("w1", "w3", "w2"), f.expert_keys, strict=True):
            names = [f"{p}{e}.{theirs}.weight" for e in range(lay.num_experts)]
            if all(n in hf for n in names):
                shapes = {tuple(hf[n].shape) for n in names}
                if len(shapes) != 1:
                    raise MoectlError(f"{where}: the experts of layer {i} have {theirs} tensors of different shapes "
                                      f"({sorted(shapes)})", hint="the checkpoint is damaged")
                import torch

                out[f"layers.{i}.mlp.moe.experts.{ours}"] = torch.stack([hf[n].t() for n in names]).contiguous()
                used.update(names)
    missing = [k for k in expected if k not in out]
    unexpected = sorted(set(hf) - used)
    shapes = [f"{k} {list(out[k].shape)} (the config implies {list(expected[k])})" for k in expected
              if k in out and tuple(out[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
            if names:
                more = f" and {len(names) - 4} more" if len(names) > 4 else ""
                parts.append(f"{label}: {', '.join(names[:4])}{more}")
        raise MoectlError(f"{where}: the weights do not fit its config.json as a {f.name} model ({'; '.join(parts)})",
                          hint="the folder's config.json and weights do not belong together, or a file is damaged")
    return out
