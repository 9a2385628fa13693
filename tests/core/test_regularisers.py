"""The regularisers as recipe choices, inside the model: the balance loss's form and pooling reach
every router and the competition, the mean over layers divides the weight, and the recurrent
router's output bias enters its logits; each against a hand computation on a small input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moectl.core import MoETransformer, RoutingMode
from moectl.core.compete import CompeteFFN, CompetitionOptions
from moectl.core.losses import load_balance_loss, neg_entropy, z_loss
from moectl.core.routers import RouteContext
from tests.core.helpers import tiny_args

B, S = 3, 8


def _model(seed=0, **kw) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(tiny_args(**kw))


def _tokens():
    return torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(1))


def _forward(model):
    seen = []
    out = model(_tokens(), _tokens(), mode=RoutingMode(observer=seen.append))
    return out, seen


def test_default_regularisers_are_the_switch_loss_and_z_loss_bit_for_bit():
    out, seen = _forward(_model())
    assert len(seen) == len(out.records) == 2
    for obs, rec in zip(seen, out.records, strict=True):
        assert torch.equal(rec.losses["load_balance"], load_balance_loss(obs.probs_TE, obs.expert_ids_TK))
        assert torch.equal(rec.losses["z_loss"], z_loss(obs.logits_TE))
    expected = torch.stack([0.01 * r.losses["load_balance"] + 0.001 * r.losses["z_loss"] for r in out.records])
    torch.testing.assert_close(out.aux_loss, expected.sum(), rtol=0, atol=1e-9)


def test_entropy_per_sequence_reaches_every_router():
    out, seen = _forward(_model(balance_form="entropy", balance_pooling="sequence"))
    for obs, rec in zip(seen, out.records, strict=True):
        per_sequence = obs.probs_TE.reshape(B, S, -1).mean(1)             # [B, E]
        expected = sum(sum(p * math.log(p) for p in row.tolist()) for row in per_sequence) / B
        assert abs(rec.losses["load_balance"].item() - expected) < 1e-6


@pytest.mark.parametrize("kw", [{}, {"block": "cartesian"}])
def test_mean_over_layers_divides_the_balance_weight(kw):
    summed, _ = _forward(_model(z_loss_weight=0.0, **kw))
    averaged, _ = _forward(_model(z_loss_weight=0.0, balance_over_layers="mean", **kw))
    layers = len(summed.records)
    assert layers == (4 if kw else 2)   # a cartesian layer is two routed sub-layers
    torch.testing.assert_close(averaged.aux_loss * layers, summed.aux_loss, rtol=1e-6, atol=0)
    assert torch.equal(averaged.loss, summed.loss)   # the same model; only the weight differs


def test_mean_over_layers_leaves_the_z_loss_alone():
    summed, _ = _forward(_model(aux_loss_weight=0.0))
    averaged, _ = _forward(_model(aux_loss_weight=0.0, balance_over_layers="mean"))
    assert torch.equal(averaged.aux_loss, summed.aux_loss)


# --------------------------------------------------------------------------- recurrent output bias


def _recurrent(output_bias: bool, init: str | None = None, num_experts: int = 4):
    torch.manual_seed(0)
    return MoETransformer(tiny_args("recurrent", {"hidden": 6, "output_bias": output_bias}, router_init=init,
                                    num_experts=num_experts))


def test_recurrent_output_bias_enters_the_logits():
    model = _recurrent(True)
    routers = [layer.router for layer in model.routed_layers()]
    with torch.no_grad():
        for r in routers:
            r.bias.copy_(torch.arange(r.num_experts, dtype=torch.float32) * 0.3)
    _, seen = _forward(model)
    cell = model.router_shared.cell
    h = None
    for obs, router in zip(seen, routers, strict=True):
        x = obs.x_TD @ router.projector.weight.t()
        h = cell(x, torch.zeros(x.shape[0], 6) if h is None else h)
        expected = h @ router.weight.t() + router.bias
        torch.testing.assert_close(obs.logits_TE, expected, rtol=1e-5, atol=1e-6)


def test_recurrent_output_bias_parameters_and_initialisation():
    plain, biased = _recurrent(False), _recurrent(True)
    extra = sum(p.numel() for p in biased.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 2 * 4   # one bias of E = 4 per routed layer
    assert "layers.0.mlp.moe.router.bias" in biased.state_dict()
    bound = 1 / math.sqrt(6)   # like an nn.Linear(hidden, E): U(+-1/sqrt(hidden)), not 1/sqrt(d_model = 32)
    torch_default = _recurrent(True, "torch_default", num_experts=64).routed_layers()[0].router.bias
    assert 0.9 * bound < torch_default.abs().max() <= bound
    assert torch.equal(_recurrent(True, "sigma_moe").routed_layers()[0].router.bias, torch.zeros(4))
    assert torch.equal(_recurrent(True).routed_layers()[0].router.bias, torch.zeros(4))   # scaled_normal


# --------------------------------------------------------------------------- competition balance


def _compete_layer(**comp):
    torch.manual_seed(0)
    layer = CompeteFFN(tiny_args(competition=CompetitionOptions(**comp), d_model=8, num_experts=5, top_k=2,
                                 expert_hidden=12, backend="loop"))
    for m in layer.modules():
        if hasattr(m, "init_weights"):
            m.init_weights(0.5, 0.5)
    return layer.train()


def _responses(layer, x):
    b = layer.experts
    outs = torch.stack([(F.silu(x @ b.w1[e]) * (x @ b.w3[e])) @ b.w2[e] for e in range(5)], 1)   # [T, E, D]
    return F.softplus(outs).mean(-1)


def test_competition_balance_default_is_switch_on_first_winners():
    layer = _compete_layer()
    x = torch.randn(6, 8)
    _, _, rec = layer(x, RouteContext(plan=frozenset({0})))
    s = _responses(layer, x)
    first = s.argmax(-1)
    f = torch.bincount(first, minlength=5).float() / 6
    expected = 5 * (f * s.softmax(-1).mean(0)).sum()
    assert abs(rec.losses["compete_balance"].item() - expected.item()) < 1e-6


def test_competition_balance_of_the_language_model_code():
    layer = _compete_layer(balance_form="entropy", balance_pooling="sequence", balance_scores="double_softmax")
    x = torch.randn(6, 8)
    _, _, rec = layer(x, RouteContext(plan=frozenset({0}), seq_len=3))
    q = _responses(layer, x).softmax(-1).softmax(-1)     # the code's log-softmax of probabilities
    per_sequence = q.reshape(2, 3, 5).mean(1)
    expected = neg_entropy(per_sequence).mean()
    assert abs(rec.losses["compete_balance"].item() - expected.item()) < 1e-6
    # a double softmax of values in (0, 1) is nearly flat: the loss sits close to -log E
    assert abs(expected.item() + math.log(5)) < 0.05


def test_competition_balance_weight_follows_the_mean_over_layers():
    args = tiny_args(competition=CompetitionOptions(balance_weight=0.005), balance_over_layers="mean")
    torch.manual_seed(0)
    model = MoETransformer(args)
    for layer in model.routed_layers():
        assert layer.loss_weights["compete_balance"] == pytest.approx(0.005 / 2)
        assert layer.loss_weights["load_balance"] == pytest.approx(0.01 / 2)
        assert layer.loss_weights["router_distill"] == 0.001   # not a balance loss


@pytest.mark.parametrize("kind, first", [("topk", "balance loss 0.01 x Switch over all slots, over the batch, summed"),
                                         ("expert_choice", "no balance loss (expert_choice balances by construction)"),
                                         ("hash", "no router losses (hash routing learns nothing)")])
def test_build_describes_what_each_router_computes(kind, first):
    model = _model(router_kind=kind)
    lines = model.routed_layers()[0].regularisers(model.args.moe)
    assert lines[0].startswith(first)
    out, _ = _forward(model)
    has_balance = "load_balance" in out.records[0].losses
    assert has_balance == (kind == "topk")
