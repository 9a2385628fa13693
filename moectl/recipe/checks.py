"""Checks that involve more than one field. Each returns the key path it is about, so errors point
at the value to change. Checks that belong to one router, block kind or routed-layer variant live
with that part (its class's `check(moe)` hook), so adding a part adds its checks too."""

from __future__ import annotations

from moectl.core import registry
from moectl.errors import Issue
from moectl.recipe.schema import Recipe, variant_fields


def check_recipe(r: Recipe) -> list[Issue]:
    issues: list[Issue] = []
    add = lambda path, msg, related=None: issues.append(Issue(path, msg, related=related))
    m = r.model
    if m.head_dim is not None:
        if m.head_dim % 2:
            add("model.head_dim", f"the head size ({m.head_dim}) must be even for RoPE")
    elif m.d_model % m.n_heads:
        add("model.n_heads", f"d_model ({m.d_model}) must be divisible by n_heads ({m.n_heads}), "
            "or model.head_dim must be set")
    elif (m.d_model // m.n_heads) % 2:
        add("model.n_heads", f"the head size d_model/n_heads = {m.d_model // m.n_heads} must be even for RoPE")
    rs = m.rope_scaling
    if rs is not None and rs.kind == "llama3" and rs.low_freq_factor >= rs.high_freq_factor:
        add("model.rope_scaling.high_freq_factor", f"must exceed low_freq_factor ({rs.low_freq_factor})")
    if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
        add("model.n_kv_heads", f"n_heads ({m.n_heads}) must be divisible by n_kv_heads ({m.n_kv_heads})")
    t = r.train
    if t.max_steps is not None and t.max_tokens is not None:
        add("train.max_tokens", "give either train.max_steps or train.max_tokens, not both", "train.max_steps")
    if t.warmup_steps and t.max_steps is not None and t.warmup_steps >= t.max_steps:
        add("train.warmup_steps", f"warmup_steps ({t.warmup_steps}) must be below max_steps ({t.max_steps})",
            "train.max_steps")
    if m.latent_attention is not None:
        la = m.latent_attention
        if la.rope_dim % 2:
            add("model.latent_attention.rope_dim", f"must be even (RoPE rotates pairs), not {la.rope_dim}")
        for key, off in (("qk_norm", m.qk_norm == "none"), ("qkv_clip", m.qkv_clip is None),
                         ("attention_sinks", not m.attention_sinks), ("head_dim", m.head_dim is None),
                         ("n_kv_heads", m.n_kv_heads is None), ("attention_bias", m.attention_bias != "qkv")):
            if not off:
                add(f"model.{key}", "does not apply to latent attention (model.latent_attention); leave it out",
                    "model.latent_attention")
    if m.sliding_window is None and m.sliding_layers != "all":
        add("model.sliding_layers", "has no effect without model.sliding_window", "model.sliding_window")
    if isinstance(m.sliding_layers, list) and any(i >= m.n_layers for i in m.sliding_layers):
        add("model.sliding_layers", f"names a layer the model does not have (it has {m.n_layers}: 0 .. "
            f"{m.n_layers - 1})", "model.n_layers")
    if m.moe is not None:
        issues += _check_moe(r)
    if t.expert_parallel > 1:
        issues += _check_expert_parallel(r)
    return issues


def _check_expert_parallel(r: Recipe) -> list[Issue]:
    n, moe, key = r.train.expert_parallel, r.model.moe, "train.expert_parallel"
    if moe is None:
        return [Issue(key, f"{n} needs routed experts to split, and the model has no model.moe")]
    issues = []
    if moe.num_experts % n:
        issues.append(Issue(key, f"{n} must divide model.moe.num_experts ({moe.num_experts})",
                            related="model.moe.num_experts"))
    for name in variant_fields():   # a variant says whether it runs under expert parallelism
        if getattr(moe, name, None) is not None and not vars(registry.variants.get(name).cls).get("expert_parallel"):
            issues.append(Issue(key, f"model.moe.{name} does not declare support for expert parallelism (its layer "
                                "would need every expert in every process); set train.expert_parallel: 1"))
    return issues


def _check_moe(r: Recipe) -> list[Issue]:
    issues: list[Issue] = []
    add = lambda path, msg, related=None: issues.append(Issue(path, msg, related=related))
    m, moe = r.model, r.model.moe
    if moe.top_k > moe.num_experts:
        add("model.moe.top_k", f"top_k ({moe.top_k}) cannot exceed num_experts ({moe.num_experts})",
            "model.moe.num_experts")
    if isinstance(moe.layers, list):
        if moe.first_dense:
            add("model.moe.first_dense", f"first_dense ({moe.first_dense}) applies to layers 'all' and "
                "'every_other', but model.moe.layers is an explicit list; set first_dense to 0 (or leave it out)",
                "model.moe.layers")
        bad = [i for i in moe.layers if not 0 <= i < m.n_layers]
        if bad:
            add("model.moe.layers", f"layer index {bad[0]} is outside 0..{m.n_layers - 1}", "model.n_layers")
        if len(set(moe.layers)) != len(moe.layers):
            add("model.moe.layers", "layer indices must not repeat")
        if not moe.layers:
            add("model.moe.layers", "the list is empty; set model.moe: null for a dense model")
    elif moe.first_dense >= m.n_layers:
        add("model.moe.first_dense", f"first_dense ({moe.first_dense}) leaves no MoE layer in a "
            f"{m.n_layers}-layer model", "model.n_layers")
    if moe.shared_mix == "gate" and moe.shared_experts == 0:
        add("model.moe.shared_mix", "'gate' mixes routed and shared outputs, but shared_experts is 0",
            "model.moe.shared_experts")
    if moe.shared_hidden is not None and moe.shared_experts == 0:
        add("model.moe.shared_hidden", "has no effect while shared_experts is 0", "model.moe.shared_experts")
    chosen = [name for name in variant_fields() if getattr(moe, name, None) is not None]
    if len(chosen) > 1:
        add(f"model.moe.{chosen[1]}", f"only one routed-layer variant can be on; model.moe.{chosen[0]} is set too",
            f"model.moe.{chosen[0]}")
    parts = [registry.routers.get(moe.router.kind).cls, registry.blocks.get(moe.block.kind).cls]
    parts += [registry.variants.get(name).cls for name in chosen[:1]]
    for part in parts:
        for path, msg in part.check(moe):
            add(f"model.moe.{path}", msg)
    return issues
