"""The routing-robustness perturbation: in every router, each token's most probable expert is
dropped and K experts are taken from the rest."""

from __future__ import annotations

import pytest
import torch

from moectl.core import MoETransformer, RoutingMode
from moectl.core.compete import CompetitionOptions
from moectl.core.moe import RouterContractError
from moectl.core.routers.topp import topp_select
from moectl.eval.runner import robustness_refusal
from tests.core.helpers import tiny_args

KINDS = {  # name: tiny_args keywords
    "topk": {},
    "topk-k1": {"top_k": 1},
    "topk-sigmoid-bias": {"router_options": {"score_func": "sigmoid", "bias_update_rate": 0.01}},
    "topk-switch": {"router_options": {"renormalize": False}},
    "topp": {"router_kind": "topp", "router_options": {"p": 0.5}},
    "hash": {"router_kind": "hash"},
    "recurrent": {"router_kind": "recurrent"},
    "cartesian": {"block": "cartesian"},
    "cartesian-recurrent": {"block": "cartesian", "router_kind": "recurrent"},
    "competition": {"competition": CompetitionOptions()},
    "capacity": {"capacity_factor": 1.0},
    "shared": {"shared_experts": 1},
}


def _model(kw: dict) -> MoETransformer:
    torch.manual_seed(0)
    model = MoETransformer(tiny_args(**kw)).eval()
    for layer in model.routed_layers():
        bias = getattr(layer.router, "expert_bias", None)
        if bias is not None:
            bias.copy_(torch.randn(bias.shape))   # a bias that changes the choice
    return model


@pytest.mark.parametrize("name", list(KINDS))
def test_dropped_expert_is_never_chosen_and_k_is_kept(name):
    model = _model(KINDS[name])
    assert robustness_refusal(model) is None
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    seen = {}

    def check(o):
        top1 = o.probs_TE.argmax(-1)
        chosen = o.expert_ids_TK
        live = torch.ones_like(chosen, dtype=torch.bool) if o.valid_TK is None else o.valid_TK
        router = o.layer.router
        if o.layer.capacity_factor is None and router.fixed_k:
            assert chosen.shape[1] == router.top_k and bool(live.all()), "K changed"
        assert not bool(((chosen == top1[:, None]) & live).any()), "the dropped expert was chosen"
        seen[o.name] = seen.get(o.name, 0) + 1

    with torch.no_grad():
        plain = model(tokens, mode=RoutingMode(observer=lambda o: None))
        perturbed = model(tokens, mode=RoutingMode(observer=check, drop_top1=True))
    assert set(seen) == {layer.name for layer in model.routed_layers()}
    assert not torch.allclose(plain.logits, perturbed.logits)


def test_unperturbed_routing_uses_the_top1_expert():
    """The check above would pass vacuously if no router ever chose its top-1 expert."""
    model = _model({})
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    hits = []
    with torch.no_grad():
        model(tokens, mode=RoutingMode(observer=lambda o: hits.append(
            bool((o.expert_ids_TK[:, 0] == o.probs_TE.argmax(-1)).all()))))
    assert all(hits)


def test_top_p_thresholds_the_remaining_original_probabilities():
    probs = torch.tensor([[0.50, 0.30, 0.15, 0.05]])
    ids, w, valid = topp_select(probs, p=0.4, max_k=4, exclude_TE=probs == probs.max())
    kept = ids[valid].tolist()
    # without expert 0: 0.30 (running sum 0.30 <= 0.4, keep), 0.15 (sum before it 0.30 <= 0.4, keep),
    # 0.05 (sum before it 0.45 > 0.4, stop); weights are the original probabilities
    assert kept == [1, 2]
    assert w[valid].tolist() == pytest.approx([0.30, 0.15])


def test_expert_choice_and_full_routing_are_refused_with_a_reason():
    ec = MoETransformer(tiny_args("expert_choice")).eval()
    assert "experts choose tokens" in robustness_refusal(ec)
    full = MoETransformer(tiny_args(top_k=4)).eval()
    assert "nothing is left" in robustness_refusal(full)
    dense = MoETransformer(tiny_args().__class__(**{**tiny_args().__dict__, "moe": None})).eval()
    assert "dense" in robustness_refusal(dense)


def test_a_router_that_ignores_the_perturbation_is_caught():
    model = _model({})
    router = model.routed_layers()[0].router
    router.drop_top1_refusal = None
    original = type(router).top1_excluded
    type(router).top1_excluded = lambda self, probs, ctx: None     # a router that never drops anything
    try:
        with pytest.raises(RouterContractError, match="most probable expert"):
            with torch.no_grad():
                model(torch.zeros(1, 8, dtype=torch.long), mode=RoutingMode(drop_top1=True))
    finally:
        type(router).top1_excluded = original


def test_a_single_expert_is_refused():
    model = MoETransformer(tiny_args("topp", num_experts=1, top_k=1)).eval()
    assert "single expert" in robustness_refusal(model)
