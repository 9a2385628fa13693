"""What every Hugging Face family shares: the `Family` base class, the config reader with its clear
errors, the key-map template, the RoPE row reordering, and the state-dict conversion both ways.

A family (one module of this package) is a `Family` subclass that says three things:

- which moectl models its transformers class computes exactly (`misfits` and the hooks it calls),
- how its config.json maps to a recipe's model section and back (`config_to_hf`, `model_from_hf`,
  `experts_from_hf`, on top of the keys every family shares),
- where its checkpoints keep the tensors of a layer's MLP part (`keys`, a `KeyMap` of templates with
  `{i}` for the layer and `{e}` for the expert; embeddings, norms and attention are common).

Tensors are renamed, transposed and (for RoPE) reordered, never recomputed, so a round trip is bit
for bit. RoPE layouts: moectl rotates interleaved pairs (x[2i], x[2i+1]); the Hugging Face families
rotate halves (x[i], x[i + d/2]). The rows of the query and key projections (and of their biases and
q/k-norm weights) are reordered per head on the way through, which leaves every attention score
unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from moectl.convert.hfio import DictSource, Spec, TensorSource
from moectl.errors import MoectlError
from moectl.recipe.schema import variant_fields

if TYPE_CHECKING:
    from torch import Tensor

    from moectl.recipe.schema import ModelConfig, MoEConfig

CONVERT_HINT = "see docs/convert.md for what each family supports"
W_NAMES = ("w1", "w3", "w2")   # moectl's gate, up and down matrices


@dataclass(frozen=True)
class KeyMap:
    """Where a family's checkpoints keep the tensors of a layer's MLP part, as name templates with
    `{i}` for the layer and `{e}` for the expert. Matrices come in moectl's order w1 (gate), w3 (up),
    w2 (down)."""

    dense: tuple[str, str, str] = ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight",
                                   "model.layers.{i}.mlp.down_proj.weight")
    router: str = "model.layers.{i}.mlp.gate.weight"
    experts: tuple[str, str, str] = ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
                                     "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
                                     "model.layers.{i}.mlp.experts.{e}.down_proj.weight")
    # transformers v5's fused in-memory layout: gate_up [E, 2F, D], down [E, D, F]
    fused: tuple[str, str] = ("model.layers.{i}.mlp.experts.gate_up_proj", "model.layers.{i}.mlp.experts.down_proj")
    shared: tuple[str, str, str] | None = None
    shared_gate: str | None = None
    router_bias: str | None = None   # the router's selection bias (DeepSeek-V3's e_score_correction_bias)
    gate_bias: str | None = None     # a bias on the router's logits (GPT-OSS)
    sinks: str | None = None         # attention sinks (GPT-OSS)
    # (in-memory, on-disk) name parts: transformers v5 saves some families under other module names
    renames: tuple[tuple[str, str], ...] = ()


# (moectl template, family template, how) of every layer's norms and attention; `how` is copy, q, k
# (RoPE rows) or qn, kn (q/k-norm weights)
LAYER_KEYS = (("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", "copy"),
              ("layers.{i}.mlp.norm.weight", "model.layers.{i}.post_attention_layernorm.weight", "copy"),
              *((f"layers.{{i}}.attn.{ours}.{kind}", f"model.layers.{{i}}.self_attn.{theirs}.{kind}", how)
                for ours, theirs, how in (("wq", "q_proj", "q"), ("wk", "k_proj", "k"), ("wv", "v_proj", "copy"),
                                          ("wo", "o_proj", "copy"))
                for kind in ("weight", "bias")))
QK_NORM_KEYS = (("layers.{i}.attn.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight", "qn"),
                ("layers.{i}.attn.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight", "kn"))


class Family:
    """One Hugging Face model family, converted both ways. Subclasses set the class attributes and
    override the hooks where the family differs; `misfits`, `hf_config` and `model_section` hold
    what every family shares."""

    name: ClassVar[str]                  # what docs and messages call it
    model_type: ClassVar[str]            # config.json's model_type
    architecture: ClassVar[str]          # the transformers class
    moe: ClassVar[bool] = True
    order: ClassVar[int] = 100           # native_family tries families by order, then model_type
    keys: ClassVar[KeyMap] = KeyMap()
    qk_norm: ClassVar[str] = "none"      # the q/k normalisation the class always applies
    attention_biases: ClassVar[tuple[str, ...]] = ("none", "all")   # model.attention_bias values it has
    clips_qkv: ClassVar[bool] = False
    every_layer_moe: ClassVar[bool] = False   # no dense layers between MoE layers
    rope_theta_default: ClassVar[float] = 1e4
    aux_loss_default: ClassVar[float] = 0.001
    window_means_sliding: ClassVar[bool] = False   # sliding_window set = on (no use_sliding_window key)
    # Sliding-window attention the class computes: "none", "all" (one window in every layer) or
    # "layers" (any set of layers, written as layer_types)
    windows: ClassVar[str] = "none"
    expert_biases: ClassVar[bool] = False   # biases after every expert projection (GPT-OSS)
    latent: ClassVar[bool] = False          # multi-head latent attention (DeepSeek)

    def __repr__(self) -> str:
        return f"<family {self.name} ({self.model_type})>"

    # ----------------------------------------------------------------------- moectl -> family

    def misfits(self, m: ModelConfig) -> list[str]:
        """Why the family's transformers class cannot compute this model exactly (empty: it can)."""
        why = []
        if m.activation != "swiglu":
            why.append(f"activation {m.activation} (the family uses SwiGLU)")
        if (m.moe is not None) != self.moe:
            why.append("a dense model" if m.moe is None else "an MoE model")
        why += self.attention_misfits(m)
        if m.ffn_hidden == 0 and (m.moe is None or m.moe.layer_indices(m.n_layers) != list(range(m.n_layers))):
            why.append("attention-only dense layers (ffn_hidden 0)")
        if m.moe is None or not self.moe:
            return why
        e = m.moe
        if e.expert_bias and not self.expert_biases:
            why.append("expert biases")
        why += self.router_misfits(e.router)
        if e.block.kind != "standard":
            why.append(f"the {e.block.kind} block")
        for name in variant_fields():
            if getattr(e, name) is not None:
                why.append(f"the {name} variant")
        why += self.shared_misfits(e)
        if self.every_layer_moe and e.layer_indices(m.n_layers) != list(range(m.n_layers)):
            why.append("dense layers between MoE layers")
        return why

    def attention_misfits(self, m: ModelConfig) -> list[str]:
        why = self.window_misfits(m) + (["attention sinks"] if m.attention_sinks and self.keys.sinks is None else [])
        if m.latent_attention is not None and not self.latent:
            why.append("latent attention")
        if m.qkv_clip is not None and not self.clips_qkv:
            why.append("qkv_clip")
        if m.qk_norm != self.qk_norm:
            why.append(f"qk_norm {m.qk_norm} (the family has {self.qk_norm})")
        if m.attention_bias not in self.attention_biases:
            why.append(f"attention_bias {m.attention_bias}")
        return why

    def router_misfits(self, router: Any) -> list[str]:
        if router.kind != "topk":
            return [f"the {router.kind} router"]
        why = ["a router bias"] if getattr(router, "gate_bias", False) else []
        if router.score_func != "softmax":
            why.append("sigmoid router scores")
        if router.bias_update_rate > 0:
            why.append("aux-loss-free selection biases")
        return why

    def shared_misfits(self, e: MoEConfig) -> list[str]:
        return ["shared experts"] if e.shared_experts else []

    def hf_config(self, m: ModelConfig) -> dict[str, Any]:
        """The family's config.json fields for a moectl model section."""
        head_dim = m.head_dim or m.d_model // m.n_heads
        cfg: dict[str, Any] = {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
            "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads or m.n_heads, "head_dim": head_dim,
            "hidden_act": "silu", "max_position_embeddings": m.seq_len, "rms_norm_eps": m.norm_eps,
            "rope_theta": m.rope_theta, "rope_parameters": rope_parameters(m),
            "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std, "attention_dropout": 0.0,
            "use_cache": True,
        }
        if m.rope_scaling is not None:   # transformers v4 reads rope_scaling, v5 rope_parameters
            cfg["rope_scaling"] = {k: v for k, v in cfg["rope_parameters"].items() if k != "rope_theta"}
        if self.moe:
            cfg.update(num_experts_per_tok=m.moe.top_k, router_aux_loss_coef=m.moe.aux_loss_weight,
                       output_router_logits=False)
        cfg.update(self.config_to_hf(m))
        return cfg

    def config_to_hf(self, m: ModelConfig) -> dict[str, Any]:
        """The family's own config.json fields (on top of those every family has)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------- family -> moectl

    def model_section(self, raw: dict[str, Any], where: str) -> dict[str, Any]:
        """A recipe's model section (plain data, validated later) from a family's config.json."""
        c = ConfigReader(raw, where)
        model = self.common_from_hf(c)
        self.model_from_hf(c, model)
        if self.moe:
            model["moe"] = self.moe_from_hf(c, model)
        return model

    def common_from_hf(self, c: ConfigReader) -> dict[str, Any]:
        """The model keys every family has."""
        act = c.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise c.refuse(f"hidden_act is {act!r} (moectl's SwiGLU is silu)")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise MoectlError(f"{c.where}: rope_parameters is {rope!r}", hint="the config.json is damaged")
        scaling = rope_scaling(rope, c)
        theta = c.get("rope_theta", rope.get("rope_theta", self.rope_theta_default), (int, float))
        d, heads = c.need("hidden_size"), c.need("num_attention_heads")
        head_dim = c.get("head_dim", None, int)
        kv = c.get("num_key_value_heads", heads, int)
        n_layers = c.need("num_hidden_layers")
        inter = c.need("intermediate_size")
        if c.get("mlp_bias", False):
            raise c.refuse("mlp_bias is true (biases on the feed-forward projections)")
        if c.get("pretraining_tp", 1, int) != 1:
            raise c.refuse("pretraining_tp is not 1")
        max_pos = c.get("max_position_embeddings", 2048, int)
        window, sliding_layers = self.windows_from_hf(c, max_pos, n_layers)
        return {
            "sliding_window": window, "sliding_layers": sliding_layers,
            "vocab_size": c.need("vocab_size"), "d_model": d, "n_layers": n_layers, "n_heads": heads,
            "n_kv_heads": kv if kv != heads else None, "ffn_hidden": inter, "activation": "swiglu",
            "seq_len": max_pos, "rope_theta": float(theta), "rope_scaling": scaling,
            "norm_eps": float(c.get("rms_norm_eps", 1e-6, (int, float))),
            "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
            "init_std": float(c.get("initializer_range", 0.02, (int, float))),
            "head_dim": head_dim if head_dim is not None and head_dim * heads != d else None,
            "attention_bias": "all" if c.get("attention_bias", False) else "none",
            "qk_norm": self.qk_norm,
        }

    def windows_from_hf(self, c: ConfigReader, max_pos: int, n_layers: int) -> tuple[int | None, Any]:
        """(model.sliding_window, model.sliding_layers) from sliding_window, use_sliding_window,
        layer_types and max_window_layers; a window that never binds (at least the context) is none."""
        window = c.get("sliding_window")
        sliding = c.get("use_sliding_window", window is not None and self.window_means_sliding)
        if not sliding or window is None:
            return None, "all"
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise MoectlError(f"{c.where}: sliding_window is {window!r}", hint="the config.json is damaged")
        types = c.get("layer_types")
        if isinstance(types, list) and len(types) == n_layers:
            layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
        else:
            first = c.get("max_window_layers", 0, int) if self.windows == "layers" else 0
            layers = list(range(first, n_layers))
        if window >= max_pos or not layers:
            return None, "all"
        if self.windows == "none" or (self.windows == "all" and len(layers) != n_layers):
            raise c.refuse(f"sliding-window attention ({window} < {max_pos} positions)"
                           + (" in some layers only" if self.windows == "all" else ""))
        return window, "all" if len(layers) == n_layers else layers

    def window_misfits(self, m: ModelConfig) -> list[str]:
        if m.sliding_window is None:
            return []
        if self.windows == "none":
            return ["sliding-window attention"]
        if self.windows == "all" and m.sliding_layers != "all":
            return ["sliding windows in some layers only"]
        return []

    def windows_to_hf(self, m: ModelConfig) -> dict[str, Any]:
        """The config.json keys of the model's sliding windows (for families with windows)."""
        layers = [i for i in range(m.n_layers) if m.sliding_window is not None
                  and (m.sliding_layers == "all" or (m.sliding_layers == "even" and i % 2 == 0)
                       or (m.sliding_layers == "odd" and i % 2 == 1)
                       or (isinstance(m.sliding_layers, list) and i in m.sliding_layers))]
        if self.windows == "all":
            return {"sliding_window": m.sliding_window}
        return {"use_sliding_window": bool(layers), "sliding_window": m.sliding_window,
                "max_window_layers": layers[0] if layers else m.n_layers,
                "layer_types": ["sliding_attention" if i in layers else "full_attention" for i in range(m.n_layers)]}

    def model_from_hf(self, c: ConfigReader, model: dict[str, Any]) -> None:
        """The family's own model keys (edits `model` in place)."""

    def attention_keys(self, lay: Layout) -> list[tuple[str, str, str]]:
        """(moectl template, family template, how) of a layer's norms and attention tensors."""
        return list(LAYER_KEYS) + (list(QK_NORM_KEYS) if lay.qk_norm != "none" else [])

    def experts_from_hf_plan(self, hf: TensorSource, get, lay: Layout, i: int, out: dict, used: set[str],
                             where: str) -> None:
        """Plan layer i's expert tensors (moectl names) from the family's; mark the names used."""
        experts_from_hf(hf, get, lay, i, out, used, where)

    def experts_to_hf(self, src: TensorSource, get, lay: Layout, i: int, out: dict) -> None:
        """Plan layer i's expert tensors in the family's layout from moectl's."""
        per_expert_to_hf(src, get, lay, i, out)

    def moe_from_hf(self, c: ConfigReader, model: dict[str, Any]) -> dict[str, Any]:
        """A recipe's model.moe section: the keys every MoE family has, then `experts_from_hf`."""
        # transformers v5 writes num_local_experts for every family; published configs say num_experts
        # (DeepSeek's and dots1's: n_routed_experts)
        names = [k for k in ("num_experts", "n_routed_experts") if c.get(k) is not None]
        experts = c.need(names[0] if names else "num_local_experts")
        moe: dict[str, Any] = {
            "num_experts": experts, "top_k": c.need("num_experts_per_tok"),
            "aux_loss_weight": float(c.get("router_aux_loss_coef", self.aux_loss_default, (int, float))),
            "z_loss_weight": 0.0, "layers": "all",
            "router": {"kind": "topk", "renormalize": self.renormalizes(c),
                       "jitter_eps": float(c.get("router_jitter_noise", 0.0, (int, float)))},
        }
        moe.update(self.experts_from_hf(c, model))
        return moe

    def renormalizes(self, c: ConfigReader) -> bool:
        """Whether the top-k routing weights are renormalised to sum to 1."""
        return bool(c.get("norm_topk_prob", False))

    def experts_from_hf(self, c: ConfigReader, model: dict[str, Any]) -> dict[str, Any]:
        """The family's own model.moe keys: expert_hidden, and layers, shared experts where it has them."""
        raise NotImplementedError


# --------------------------------------------------------------------------- config helpers


class ConfigReader:
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


def rope_parameters(m: ModelConfig) -> dict[str, Any]:
    rs = m.rope_scaling
    if rs is None:
        return {"rope_type": "default", "rope_theta": m.rope_theta}
    out: dict[str, Any] = {"rope_type": rs.kind, "rope_theta": m.rope_theta, "factor": rs.factor}
    if rs.kind == "llama3":
        out.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                   original_max_position_embeddings=rs.original_context)
    if rs.kind == "yarn":
        out.update(original_max_position_embeddings=rs.original_context, beta_fast=rs.beta_fast,
                   beta_slow=rs.beta_slow, truncate=rs.truncate,
                   **{k: getattr(rs, k) for k in ("mscale", "mscale_all_dim", "attention_factor")
                      if getattr(rs, k) is not None})
    return out


def rope_scaling(rope: dict[str, Any], c: ConfigReader) -> dict[str, Any] | None:
    """A recipe's model.rope_scaling from a config's rope_parameters (or legacy rope_scaling)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind not in ("linear", "llama3", "yarn"):
        raise c.refuse(f"RoPE scaling {kind!r} (moectl implements linear, llama3 and yarn)")
    factor = rope.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool):
        raise MoectlError(f"{c.where}: the {kind} RoPE scaling has no numeric factor",
                          hint="the config.json is damaged")
    out: dict[str, Any] = {"kind": kind, "factor": float(factor)}
    if kind == "llama3":
        try:
            out.update(low_freq_factor=float(rope["low_freq_factor"]), high_freq_factor=float(rope["high_freq_factor"]),
                       original_context=int(rope["original_max_position_embeddings"]))
        except (KeyError, TypeError, ValueError):
            raise MoectlError(f"{c.where}: the llama3 RoPE scaling lacks low_freq_factor, high_freq_factor or "
                              "original_max_position_embeddings", hint="the config.json is damaged") from None
    if kind == "yarn":
        original = rope.get("original_max_position_embeddings", c.get("max_position_embeddings", 2048, int))
        if not isinstance(original, int) or isinstance(original, bool) or original < 1:
            raise MoectlError(f"{c.where}: the yarn RoPE scaling's original_max_position_embeddings is {original!r}",
                              hint="the config.json is damaged")
        out["original_context"] = original
        for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            value = rope.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                out[key] = float(value)
        if isinstance(rope.get("truncate"), bool):
            out["truncate"] = rope["truncate"]
    return out


def sparse_layers_to_hf(m: ModelConfig) -> dict[str, Any]:
    """decoder_sparse_step and mlp_only_layers (the layer pattern of the Qwen MoE families)."""
    moe_layers = set(m.moe.layer_indices(m.n_layers))
    return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(m.n_layers) if i not in moe_layers]}


def sparse_layers_from_hf(c: ConfigReader, n_layers: int) -> str | list[int]:
    """model.moe.layers from decoder_sparse_step and mlp_only_layers."""
    step = c.get("decoder_sparse_step", 1, int)
    only = c.get("mlp_only_layers", [], list)
    layers = [i for i in range(n_layers) if i not in only and step > 0 and (i + 1) % step == 0]
    if not layers:
        raise MoectlError(f"{c.where}: no layer is an MoE layer (decoder_sparse_step {step}, mlp_only_layers "
                          f"{only})", hint="import it as a dense model instead: it is not a family moectl maps")
    return "all" if layers == list(range(n_layers)) else layers


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
    q_rank: int | None = None   # latent attention's query rank (None: direct queries, or no latent attention)

    @classmethod
    def of(cls, family: Family, m: ModelConfig) -> Layout:
        moe_layers = frozenset(m.moe.layer_indices(m.n_layers)) if m.moe is not None else frozenset()
        return cls(family, m.n_layers, m.n_heads, m.n_kv_heads or m.n_heads, m.head_dim or m.d_model // m.n_heads,
                   m.qk_norm, moe_layers, m.moe.num_experts if m.moe is not None else 0, m.tie_embeddings,
                   m.latent_attention.q_rank if m.latent_attention is not None else None)


def _rope_order(head_dim: int, to_hf: bool):
    half = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])   # hf[j] = moectl[half[j]]
    return half if to_hf else torch.argsort(half)


def _reorder(t: Tensor, heads: int, head_dim: int, to_hf: bool) -> Tensor:
    """Reorder the first dimension of a per-head tensor (rows of q/k, their biases or norms)."""
    order = _rope_order(head_dim, to_hf)
    shape = t.shape
    return t.reshape(heads, head_dim, *shape[1:])[:, order].reshape(shape).contiguous()


def _pairs(lay: Layout) -> list[tuple[str, str, str]]:
    """(moectl name, family name, how) for every one-to-one tensor (all but the routed experts)."""
    out = [("embed.weight", "model.embed_tokens.weight", "copy"), ("norm.weight", "model.norm.weight", "copy")]
    if not lay.tied:
        out.append(("head.weight", "lm_head.weight", "copy"))
    keys = lay.family.keys
    for i in range(lay.n_layers):
        templates = lay.family.attention_keys(lay)
        if i not in lay.moe_layers:
            templates += [(f"layers.{{i}}.mlp.ffn.{w}.weight", theirs, "copy")
                          for w, theirs in zip(W_NAMES, keys.dense, strict=True)]
        else:
            templates.append(("layers.{i}.mlp.moe.router.weight", keys.router, "copy"))
            if keys.shared is not None:
                templates += [(f"layers.{{i}}.mlp.moe.shared.{w}.weight", theirs, "copy")
                              for w, theirs in zip(W_NAMES, keys.shared, strict=True)]
            if keys.shared_gate is not None:
                templates.append(("layers.{i}.mlp.moe.shared_gate.weight", keys.shared_gate, "copy"))
            if keys.router_bias is not None:
                templates.append(("layers.{i}.mlp.moe.router.expert_bias", keys.router_bias, "copy"))
            if keys.gate_bias is not None:
                templates.append(("layers.{i}.mlp.moe.router.bias", keys.gate_bias, "copy"))
        if keys.sinks is not None:
            templates.append(("layers.{i}.attn.sinks", keys.sinks, "copy"))
        out += [(ours.format(i=i), theirs.format(i=i), how) for ours, theirs, how in templates]
    return out


def _transform(t: Tensor, how: str, lay: Layout, to_hf: bool) -> Tensor:
    if how == "copy":
        return t
    heads = lay.n_heads if how in ("q", "qn") else lay.n_kv_heads
    if how in ("qn", "kn") and lay.qk_norm == "head":
        heads = 1
    return _reorder(t, heads, lay.head_dim, to_hf)


Producer = tuple[Spec, Callable[[], "Tensor"]]   # what a tensor will be, and how to make it when it is written


def _one_at_a_time(src: TensorSource) -> Callable[[str], Tensor]:
    """src.get, keeping the last tensor read: a layer's stacked experts are read once for all of
    its per-expert outputs (which are planned together)."""
    last: dict[str, Tensor] = {}

    def get(name: str) -> Tensor:
        if name not in last:
            last.clear()
            last[name] = src.get(name)
        return last[name]

    return get


def to_hf_plan(src: TensorSource, lay: Layout) -> dict[str, Producer]:
    """The family's tensors (one per expert matrix, as the families' published checkpoints and
    transformers' save_pretrained write them), each planned from moectl's tensors in `src` and made
    only when it is written."""
    get = _one_at_a_time(src)
    out: dict[str, Producer] = {}
    for ours, theirs, how in _pairs(lay):
        if ours in src:
            out[theirs] = (src.spec(ours), lambda ours=ours, how=how: _transform(get(ours), how, lay, to_hf=True))
    for i in sorted(lay.moe_layers):
        lay.family.experts_to_hf(src, get, lay, i, out)
    return out


def per_expert_to_hf(src: TensorSource, get: Callable[[str], Tensor], lay: Layout, i: int,
                     out: dict[str, Producer]) -> None:
    """Layer i's stacked experts as one tensor per expert matrix (`keys.experts`), and a zero
    selection bias where the class has one and the model not."""
    for w, template in zip(W_NAMES, lay.family.keys.experts, strict=True):
        name = f"layers.{i}.mlp.moe.experts.{w}"
        spec = src.spec(name)                                   # [E, in, out] -> E x [out, in]
        for e in range(spec.shape[0]):
            out[template.format(i=i, e=e)] = (Spec(spec.dtype, (spec.shape[2], spec.shape[1])),
                                              lambda name=name, e=e: get(name)[e].t().contiguous())
    bias = lay.family.keys.router_bias
    if bias is not None and bias.format(i=i) not in out:   # the class has one; a model without it: zero
        out[bias.format(i=i)] = (Spec(torch.float32, (lay.num_experts,)), lambda: torch.zeros(lay.num_experts))


def to_hf_state(state: dict[str, Tensor], lay: Layout) -> dict[str, Tensor]:
    """A moectl state dict in the family's on-disk layout, in memory (see `to_hf_plan`)."""
    return {name: make() for name, (_, make) in to_hf_plan(DictSource(state), lay).items()}


class Renamed(TensorSource):
    """A source's tensors under other names (`rename(name)` -> new name)."""

    def __init__(self, src: TensorSource, rename: Callable[[str], str], keep: Callable[[str], bool] = lambda n: True):
        self.src = src
        self.to_src = {rename(n): n for n in src.names() if keep(n)}

    def names(self) -> list[str]:
        return list(self.to_src)

    def __contains__(self, name: object) -> bool:
        return name in self.to_src

    def spec(self, name: str):
        return self.src.spec(self.to_src[name])

    def get(self, name: str) -> Tensor:
        return self.src.get(self.to_src[name])


def from_hf_plan(src: TensorSource, lay: Layout, expected: dict[str, tuple[int, ...]], where: str
                 ) -> dict[str, Producer]:
    """moectl's tensors, each planned from the family's tensors in `src` (per-expert or fused:
    transformers v5's gate_up_proj / down_proj) and made only when it is written. `expected` holds
    the moectl model's tensor shapes; anything missing, left over or of another shape is an error
    naming the tensors, found from the files' headers before any tensor is read."""
    renames = lay.family.keys.renames

    def rename(name: str) -> str:
        for loaded, saved in renames:
            name = name.replace(loaded, saved, 1)
        return name

    hf = Renamed(src, rename, keep=lambda n: not n.endswith("rotary_emb.inv_freq"))
    get = _one_at_a_time(hf)
    used: set[str] = set()
    out: dict[str, Producer] = {}
    for ours, theirs, how in _pairs(lay):
        if ours in expected and theirs in hf:
            out[ours] = (hf.spec(theirs), lambda theirs=theirs, how=how: _transform(get(theirs), how, lay, to_hf=False))
            used.add(theirs)
    if lay.tied and "lm_head.weight" in hf:
        used.add("lm_head.weight")   # a tied head saved anyway
    for i in sorted(lay.moe_layers):
        lay.family.experts_from_hf_plan(hf, get, lay, i, out, used, where)
    _check_complete({k: spec.shape for k, (spec, _) in out.items()}, expected, set(hf.names()) - used, lay.family,
                    where)
    return out


def from_hf_state(hf: dict[str, Tensor], lay: Layout, expected: dict[str, tuple[int, ...]], where: str
                  ) -> dict[str, Tensor]:
    """A moectl state dict from the family's tensors, in memory (see `from_hf_plan`)."""
    return {name: make() for name, (_, make) in from_hf_plan(DictSource(hf), lay, expected, where).items()}


def experts_from_hf(hf: TensorSource, get: Callable[[str], Tensor], lay: Layout, i: int, out: dict[str, Producer],
                    used: set[str], where: str) -> None:
    """Layer i's stacked expert matrices, from the fused or the per-expert layout."""
    keys = lay.family.keys
    fused_in, fused_out = (t.format(i=i) for t in keys.fused)
    if fused_in in hf and fused_out in hf:
        gate_up, down = hf.spec(fused_in), hf.spec(fused_out)            # [E, 2F, D], [E, D, F]
        E, width, D = gate_up.shape[0], gate_up.shape[1] // 2, gate_up.shape[2]
        for w, part in (("w1", slice(0, width)), ("w3", slice(width, 2 * width))):
            out[f"layers.{i}.mlp.moe.experts.{w}"] = (
                Spec(gate_up.dtype, (E, D, width)),
                lambda part=part: get(fused_in)[:, part].transpose(1, 2).contiguous())
        out[f"layers.{i}.mlp.moe.experts.w2"] = (Spec(down.dtype, (down.shape[0], down.shape[2], down.shape[1])),
                                                 lambda: get(fused_out).transpose(1, 2).contiguous())
        used.update((fused_in, fused_out))
        return
    for w, template in zip(W_NAMES, keys.experts, strict=True):
        names = [template.format(i=i, e=e) for e in range(lay.num_experts)]
        if all(n in hf for n in names):
            specs = {hf.spec(n) for n in names}
            if len(specs) != 1:
                theirs = template.rsplit(".", 2)[-2]
                raise MoectlError(f"{where}: the experts of layer {i} have {theirs} tensors of different shapes or "
                                  f"dtypes ({sorted((str(s.dtype), s.shape) for s in specs)})",
                                  hint="the checkpoint is damaged")
            (spec,) = specs
            out[f"layers.{i}.mlp.moe.experts.{w}"] = (
                Spec(spec.dtype, (lay.num_experts, *reversed(spec.shape))),
                lambda names=names: torch.stack([hf.get(n).t() for n in names]).contiguous())
            used.update(names)


def _check_complete(out: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], unused: set[str],
                    family: Family, where: str) -> None:
    missing = [k for k in expected if k not in out]
    unexpected = sorted(unused)
    shapes = [f"{k} {list(out[k])} (the config implies {list(expected[k])})" for k in expected
              if k in out and tuple(out[k]) != expected[k]]
    if missing or unexpected or shapes:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
            if names:
                more = f" and {len(names) - 4} more" if len(names) > 4 else ""
                parts.append(f"{label}: {', '.join(names[:4])}{more}")
        raise MoectlError(f"{where}: the weights do not fit its config.json as a {family.name} model "
                          f"({'; '.join(parts)})",
                          hint="the folder's config.json and weights do not belong together, or a file is damaged")
