"""Checks that involve more than one field. Each returns the key path it is about, so errors point
at the value to change."""

from __future__ import annotations

from moectl.errors import Issue
from moectl.recipe.schema import Recipe


def check_recipe(r: Recipe) -> list[Issue]:
    issues: list[Issue] = []
    add = lambda path, msg: issues.append(Issue(path, msg))  # noqa: E731
    m = r.model
    if m.d_model % m.n_heads:
        add("model.n_heads", f"d_model ({m.d_model}) must be divisible by n_heads ({m.n_heads})")
    elif (m.d_model // m.n_heads) % 2:
        add("model.n_heads", f"the head size d_model/n_heads = {m.d_model // m.n_heads} must be even for RoPE")
    if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
        add("model.n_kv_heads", f"n_heads ({m.n_heads}) must be divisible by n_kv_heads ({m.n_kv_heads})")
    t = r.train
    if t.max_steps is not None and t.max_tokens is not None:
        add("train.max_tokens", "give either train.max_steps or train.max_tokens, not both")
    if t.warmup_steps and t.max_steps is not None and t.warmup_steps >= t.max_steps:
        add("train.warmup_steps", f"warmup_steps ({t.warmup_steps}) must be below max_steps ({t.max_steps})")
    moe = m.moe
    if moe is None:
        return issues
    router = moe.router
    if moe.top_k > moe.num_experts:
        add("model.moe.top_k", f"top_k ({moe.top_k}) cannot exceed num_experts ({moe.num_experts})")
    if isinstance(moe.layers, list):
        if moe.first_dense:
            add("model.moe.first_dense", "first_dense applies to 'all' and 'every_other'; with an explicit "
                "list of layers, leave it out")
        bad = [i for i in moe.layers if not 0 <= i < m.n_layers]
        if bad:
            add("model.moe.layers", f"layer index {bad[0]} is outside 0..{m.n_layers - 1}")
        if len(set(moe.layers)) != len(moe.layers):
            add("model.moe.layers", "layer indices must not repeat")
        if not moe.layers:
            add("model.moe.layers", "the list is empty; set model.moe: null for a dense model")
    elif moe.first_dense >= m.n_layers:
        add("model.moe.first_dense", f"first_dense ({moe.first_dense}) leaves no MoE layer in a "
            f"{m.n_layers}-layer model")
    if moe.shared_mix == "gate" and moe.shared_experts == 0:
        add("model.moe.shared_mix", "'gate' mixes routed and shared outputs, but shared_experts is 0")
    if moe.shared_hidden is not None and moe.shared_experts == 0:
        add("model.moe.shared_hidden", "has no effect while shared_experts is 0")
    if router.kind == "expert_choice" and moe.capacity_factor is not None:
        add("model.moe.capacity_factor", "expert_choice sets its own capacity "
            "(model.moe.router.capacity_factor); leave model.moe.capacity_factor null")
    if router.kind == "topp" and router.max_k is not None and router.max_k > moe.num_experts:
        add("model.moe.router.max_k", f"max_k ({router.max_k}) cannot exceed num_experts ({moe.num_experts})")
    if moe.competition is not None and router.kind not in ("topk", "recurrent"):
        add("model.moe.competition", f"competition distils into a learned token-choice router (topk or "
            f"recurrent), not {router.kind!r}")
    if moe.competition is not None and router.kind == "topk" and router.bias_update_rate > 0:
        add("model.moe.router.bias_update_rate", "aux-loss-free balancing does not combine with competition: on "
            "competition steps the loads are the competition's choices, not the router's; set it to 0")
    if router.kind == "recurrent" and router.detach_state and not router.pass_state:
        add("model.moe.router.detach_state", "has no effect with pass_state: false (there is no state to detach)")
    return issues
