"""Initialisation schemes: the statistics of the drawn tensors, per scheme and per part."""

from __future__ import annotations

import math

import pytest
import torch

from moectl.core import ModelArgs, MoEArgs, MoETransformer
from moectl.core.routers.recurrent import RecurrentOptions

D, F, E, V, L = 96, 160, 12, 300, 4


def _model(init="scaled_normal", moe_init=None, router_init=None, router=None, shared=1, tie=False):
    torch.manual_seed(0)
    moe = MoEArgs(num_experts=E, top_k=2, expert_hidden=F, layers=[1, 3], shared_experts=shared,
                  shared_mix="gate", init=moe_init, router_init=router_init)
    if router is not None:
        moe.router = router
    return MoETransformer(ModelArgs(vocab_size=V, d_model=D, n_layers=L, n_heads=4, ffn_hidden=128,
                                    tie_embeddings=tie, init=init, moe=moe))


def _close(t, std, rel=0.06):
    assert t.float().std().item() == pytest.approx(std, rel=rel), (tuple(t.shape), t.std().item(), std)
    assert abs(t.float().mean().item()) < 4 * std / math.sqrt(t.numel()) + 1e-6


def _uniform(t, fan_in, rel=0.06):
    bound = 1 / math.sqrt(fan_in)
    assert t.abs().max().item() <= bound + 1e-7
    _close(t, bound / math.sqrt(3), rel)


def test_scaled_normal_is_the_default_and_naming_it_changes_nothing():
    a, b = _model(), _model(moe_init="scaled_normal", router_init="scaled_normal")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k
    layer = a.routed_layers()[0]
    _close(a.embed.weight, 0.02)
    _close(layer.experts.w1, 0.02)
    _close(layer.experts.w2, 0.02 / math.sqrt(2 * L))
    _close(a.layers[0].attn.wo.weight, 0.02 / math.sqrt(2 * L))


def test_torch_default_everywhere():
    m = _model("torch_default")
    _close(m.embed.weight, 1.0, rel=0.03)
    _uniform(m.head.weight, D)
    attn = m.layers[0].attn
    _uniform(attn.wq.weight, D)
    _uniform(attn.wo.weight, D)
    dense = m.layers[0].mlp.ffn
    _uniform(dense.w1.weight, D)
    _uniform(dense.w2.weight, 128)
    layer = m.routed_layers()[0]
    _uniform(layer.router.weight, D)
    _uniform(layer.experts.w1, D)
    _uniform(layer.experts.w3, D)
    _uniform(layer.experts.w2, F)
    _uniform(layer.shared_gate.weight, D, rel=0.2)   # 192 values
    assert all((n.weight == 1).all() for n in m.modules() if isinstance(n, torch.nn.RMSNorm))


def test_tied_head_is_drawn_as_the_embedding():
    m = _model("torch_default", tie=True)
    assert m.head.weight is m.embed.weight
    _close(m.embed.weight, 1.0, rel=0.03)


def test_sigma_moe_on_the_moe_parts_only():
    m = _model(moe_init="sigma_moe")
    layer = m.routed_layers()[0]
    _close(layer.router.weight, D ** -0.5)
    _close(layer.experts.w1, D ** -0.5)
    _close(layer.experts.w3, D ** -0.5)
    _close(layer.experts.w2, (E * F) ** -0.5)
    _close(layer.shared.w1.weight, D ** -0.5)
    _close(layer.shared.w2.weight, F ** -0.5)
    assert (layer.shared_gate.bias == 0).all()
    _close(m.layers[0].attn.wq.weight, 0.02)      # the rest keeps model.init
    _close(m.embed.weight, 0.02)


def test_router_init_overrides_the_moe_scheme_for_routers_only():
    opts = RecurrentOptions(hidden=64)
    m = _model(moe_init="sigma_moe", router_init="torch_default", router=opts)
    layer = m.routed_layers()[0]
    _close(layer.experts.w1, D ** -0.5)            # experts: sigma_moe
    _uniform(layer.router.weight, 64)              # the gate reads the 64-wide state
    _uniform(layer.router.projector.weight, D)
    cell = m.router_shared.cell
    _uniform(cell.weight_hh, 64)
    _uniform(cell.bias_ih, 64, rel=0.15)


def test_recurrent_router_scaled_normal_and_sigma_moe():
    opts = RecurrentOptions(hidden=64)
    m = _model(router=opts)
    _close(m.router_shared.cell.weight_ih, 0.02)
    _close(m.router_shared.cell.bias_hh, 0.02, rel=0.25)   # biases too (the Megatron runs); few values
    s = _model(router_init="sigma_moe", router=opts)
    _close(s.router_shared.cell.weight_ih, 64 ** -0.5)
    assert (s.router_shared.cell.bias_ih == 0).all()


def test_hash_table_and_balancing_bias_are_not_redrawn():
    from moectl.core.routers.hash import HashOptions
    from moectl.core.routers.topk import TopKOptions

    a, b = _model(router=HashOptions()), _model("torch_default", moe_init="sigma_moe", router=HashOptions())
    assert torch.equal(a.routed_layers()[0].router.table, b.routed_layers()[0].router.table)
    c = _model("torch_default", router=TopKOptions(bias_update_rate=0.01))
    assert (c.routed_layers()[0].router.expert_bias == 0).all()


def test_recipe_keys_and_build_note(cli):
    bad = cli("build", "quickstart", "model.init=sigma_moe")
    assert bad.exit_code == 2 and "model.init" in bad.stderr
    ok = cli("build", "quickstart", "model.moe.init=sigma_moe", "model.moe.router_init=torch_default")
    assert ok.exit_code == 0, ok.output
    out = ok.stdout.replace("\n", " ")
    assert "MoE routers, experts and shared experts: sigma_moe" in out and "routers: torch_default" in out
