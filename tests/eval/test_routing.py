"""Routing statistics on hand-made routing decisions with known answers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from moectl.core.moe import RouteObservation
from moectl.core.routers.base import RouterOutput
from moectl.eval.routing import (
    RoutingAnalysis,
    binned_mutual_information,
    mutual_information_from_joint,
)


def layer(name: str, index: int, E: int = 4, K: int = 1, bias=None):
    return SimpleNamespace(name=name, index=index, num_experts=E, top_k=K,
                           router=SimpleNamespace(expert_bias=bias), alternative_name=None,
                           alternative_choice=lambda x_TD, out: None)


def obs(lay, ids_TK, probs_TE=None, valid=None, logits=None, tokens=None, alternative=None, name="competition"):
    """A layer's observation; `alternative`: the experts its variant's own mechanism chooses."""
    ids_TK = torch.as_tensor(ids_TK).long()
    if ids_TK.dim() == 1:
        ids_TK = ids_TK[:, None]
    T, E = ids_TK.shape[0], lay.num_experts
    if probs_TE is None:   # 0.7 on the first choice, the rest spread evenly
        probs_TE = torch.full((T, E), 0.3 / (E - 1))
        probs_TE.scatter_(1, ids_TK[:, :1], 0.7)
    if alternative is not None:
        lay = SimpleNamespace(**{**vars(lay), "alternative_name": name, "kind": "mine",
                                 "alternative_choice": lambda x_TD, out: alternative})
    out = RouterOutput(ids_TK, torch.ones(ids_TK.shape), probs_TE, logits)
    return RouteObservation(lay, torch.zeros(T, 1), out, valid, tokens)


def analyse(*forwards, vocab=None):
    a = RoutingAnalysis(vocab)
    for observations in forwards:
        for o in observations:
            a(o)
    return a.result()


def test_perfect_balance():
    E = 4
    r = analyse([obs(layer("L0", 0, E), torch.arange(400) % E)])["layers"]["L0"]
    assert r["tokens_per_expert"] == [100] * E
    assert r["imbalance"] == pytest.approx(1.0)
    assert r["cv"] == pytest.approx(0.0)
    assert r["dead_fraction"] == 0
    assert r["diversity"] == pytest.approx(1.0)
    assert r["utilisation"] == pytest.approx([1.0] * E)


def test_collapse_onto_one_expert():
    E = 8
    r = analyse([obs(layer("L0", 0, E), torch.zeros(64))])["layers"]["L0"]
    assert r["imbalance"] == pytest.approx(E)
    assert r["cv"] == pytest.approx(math.sqrt(E - 1))
    assert r["dead_fraction"] == pytest.approx((E - 1) / E)
    assert r["diversity"] == pytest.approx(1 / E)
    assert r["utilisation"] == pytest.approx([E] + [0.0] * (E - 1))


def test_identical_routing_in_every_layer():
    E = 4
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, E, (2000,), generator=g)
    probs = torch.softmax(torch.randn(2000, E, generator=g) * 3, -1)
    ids = probs.argmax(-1)
    r = analyse([obs(layer(f"L{i}", i, E), ids, probs) for i in range(3)])
    mi = r["mutual_information"]
    assert mi["layers"] == ["L0", "L1", "L2"]
    share = torch.bincount(ids, minlength=E).double() / len(ids)
    h_top1 = float(-(share * share.log()).sum())
    for i in range(3):
        for j in range(3):
            assert mi["top1"][i][j] == pytest.approx(h_top1, rel=1e-6)      # MI(X, X) = H(X)
            assert mi["binned"][i][j] == pytest.approx(mi["binned"][0][0], rel=1e-6)
    assert mi["binned"][0][1] > 0


def test_independent_layers():
    E = 4
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, E, (20000,), generator=g)
    b = torch.randint(0, E, (20000,), generator=g)
    r = analyse([obs(layer("L0", 0, E), a), obs(layer("L1", 1, E), b)])
    mi = r["mutual_information"]["top1"]
    assert mi[0][1] < 0.002                      # independent: (nearly) no information
    assert mi[0][0] == pytest.approx(math.log(E), abs=0.01)


def test_mutual_information_by_hand():
    # top-1 table: X = Y over two values -> ln 2; a product table -> 0
    assert mutual_information_from_joint(torch.tensor([[5, 0], [0, 5]])) == pytest.approx(math.log(2))
    assert mutual_information_from_joint(torch.tensor([[2, 2], [3, 3]])) == pytest.approx(0.0, abs=1e-12)
    # binned: label vectors over E = 4 experts, one token each
    same = torch.tensor([[0, 0, 1, 1]])
    crossed = torch.tensor([[0, 1, 0, 1]])
    assert binned_mutual_information(same, same) == pytest.approx(math.log(2))
    assert binned_mutual_information(same, crossed) == pytest.approx(0.0, abs=1e-12)
    # the two tokens' values average
    assert binned_mutual_information(torch.cat([same, same]), torch.cat([same, crossed])) == \
        pytest.approx(math.log(2) / 2)


def test_entropy_mass_and_balance_of_the_scores():
    E = 4
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.10]] * 10)
    lay = layer("L0", 0, E, K=2)
    r = analyse([obs(lay, torch.tensor([[0, 1]] * 10), probs)])["layers"]["L0"]
    h = -sum(p * math.log(p) for p in (0.5, 0.25, 0.15, 0.10))
    assert r["entropy"] == pytest.approx(h)
    assert r["topk_mass"] == pytest.approx(0.75)
    assert r["inner_balance"] == pytest.approx(2.0)          # p(1) / p(2)
    assert r["outer_balance"] == pytest.approx(0.75)          # sum of the top-k
    assert r["co_selection"][0][1] == pytest.approx(1.0)      # every token picked 0 and 1 together
    assert r["co_selection"][2][3] == 0
    hist = r["entropy_hist"]
    assert sum(hist["counts"]) == 10 and hist["edges"][-1] == pytest.approx(math.log(E))
    uniform = analyse([obs(layer("L0", 0, E), torch.arange(8) % E, torch.full((8, E), 0.25))])["layers"]["L0"]
    assert uniform["entropy"] == pytest.approx(math.log(E))
    assert uniform["entropy_hist"]["counts"][-1] == 8


def test_invalid_slots_are_not_counted():
    lay = layer("L0", 0, 4, K=2)
    ids = torch.tensor([[0, 1], [2, 3]])
    valid = torch.tensor([[True, False], [True, True]])
    r = analyse([obs(lay, ids, valid=valid)])["layers"]["L0"]
    assert r["tokens_per_expert"] == [1, 0, 1, 1]
    assert r["experts_per_token"] == pytest.approx(1.5)


def test_logit_scale_bias_and_agreement_with_the_variants_choice():
    E = 4
    logits = torch.tensor([[1.0, -1.0, 1.0, -1.0]] * 6)
    ids = torch.tensor([[0, 2]] * 6)
    probs = logits.softmax(-1)
    probs[:, 0] += 1e-3                                     # argmax expert 0
    win = torch.tensor([[0, 1]] * 3 + [[3, 2]] * 3)
    lay = layer("L0", 0, E, K=2, bias=torch.tensor([0.5, -0.5, 0.0, 0.0]))
    r = analyse([obs(lay, ids, probs, logits=logits, alternative=win)])
    L = r["layers"]["L0"]
    assert L["logit_std"] == pytest.approx(1.0)
    assert L["bias"] == [0.5, -0.5, 0.0, 0.0]
    assert L["variant_agreement"]["with"] == "competition"
    assert L["variant_agreement"]["top1"] == pytest.approx(0.5)     # first three tokens
    assert L["variant_agreement"]["overlap"] == pytest.approx(0.5)  # one of two winners each
    assert r["overall"]["variant_agreement"]["top1"] == pytest.approx(0.5)
    assert r["overall"]["variant_agreement"]["with"] == "competition"
    unnamed = analyse([obs(lay, ids, probs, logits=logits, alternative=win, name=None)])
    assert unnamed["layers"]["L0"]["variant_agreement"]["with"] == "mine"   # the variant's registered name


def test_preferred_tokens():
    E, V = 4, 16
    tokens = torch.arange(200) % V
    ids = torch.where(tokens == 7, 2, tokens % E)           # token 7 always goes to expert 2
    r = analyse([obs(layer("L0", 0, E), ids, tokens=tokens)], vocab=V)["layers"]["L0"]
    top = r["preferred_tokens"][2][0]
    assert top["share"] == pytest.approx(1.0)
    assert top["id"] in {2, 6, 7, 10, 14}                   # everything routed to 2 goes there always
    assert any(p["id"] == 7 for p in r["preferred_tokens"][2])
    assert all(p["id"] != 7 for p in r["preferred_tokens"][3])


def test_layers_are_aligned_per_forward():
    """Two forwards: the cross-layer table pairs each layer's tokens of the same forward."""
    E = 2
    f1 = [obs(layer("L0", 0, E), torch.zeros(10)), obs(layer("L1", 1, E), torch.zeros(10))]
    f2 = [obs(layer("L0", 0, E), torch.ones(10)), obs(layer("L1", 1, E), torch.ones(10))]
    mi = analyse(f1, f2)["mutual_information"]["top1"]
    assert mi[0][1] == pytest.approx(math.log(2))           # L1 copies L0 within each forward


def test_one_layer_one_expert_and_even_medians():
    one = analyse([obs(layer("L0", 0, 1), torch.zeros(6), torch.ones(6, 1))])
    L = one["layers"]["L0"]
    assert L["entropy_hist"]["counts"][0] == 6 and L["entropy"] == 0
    assert one["mutual_information"]["top1"] == [[0.0]]          # a layer with itself: H(top-1) = 0
    probs = torch.tensor([[0.6, 0.4], [0.8, 0.2]])               # p1/p2 = 1.5 and 4: median 2.75
    two = analyse([obs(layer("L0", 0, 2), torch.zeros(2), probs)])["layers"]["L0"]
    assert two["inner_balance"] == pytest.approx(2.75)
    assert two["outer_balance"] == pytest.approx(0.7)
