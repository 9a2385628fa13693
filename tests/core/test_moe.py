from __future__ import annotations

import math

import torch

from moectl.core.moe import RoutedFFN, apply_capacity
from moectl.core.routers import RouteContext
from tests.core.helpers import tiny_args


def test_capacity_keeps_first_choices_first():
    # 4 tokens, k=2, 2 experts, capacity 2: every first choice is expert 0.
    ids = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    keep = apply_capacity(ids, None, 2, capacity=2)
    # Expert 0: first choices of tokens 0,1 kept (token 2's first choice dropped, token 3's second too).
    # Expert 1: first choice of token 3, then second choice of token 0.
    assert keep.tolist() == [[True, True], [True, False], [False, False], [True, False]]
    counts = torch.bincount(ids[keep], minlength=2)
    assert (counts <= 2).all()


def test_capacity_respects_existing_mask():
    ids = torch.tensor([[0, 1], [0, 1]])
    valid = torch.tensor([[False, True], [True, True]])
    keep = apply_capacity(ids, valid, 2, capacity=1)
    assert keep.tolist() == [[False, True], [True, False]]


def _layer(**kw):
    torch.manual_seed(0)
    moe = dict(num_experts=4, top_k=2, expert_hidden=16, backend="loop")
    moe.update(kw)
    layer = RoutedFFN(tiny_args(d_model=16, **moe))
    for m in layer.modules():
        if hasattr(m, "init_weights"):
            m.init_weights(0.3, 0.3)
    return layer


def test_dropping_reported_and_applied():
    layer = _layer(capacity_factor=0.5)
    x = torch.randn(32, 16)
    y, _, rec = layer(x, RouteContext())
    cap = math.ceil(0.5 * 32 * 2 / 4)
    assert (rec.load_E <= cap).all()
    assert rec.slots.item() == 64
    assert rec.dropped.item() == 64 - rec.load_E.sum().item() > 0


def test_shared_add_and_gate():
    x = torch.randn(8, 16)
    plain = _layer()
    routed, _, _ = plain(x, RouteContext())
    add = _layer(shared_experts=1)
    add.load_state_dict(plain.state_dict(), strict=False)
    y_add, _, _ = add(x, RouteContext())
    torch.testing.assert_close(y_add, routed + add.shared(x))
    gate = _layer(shared_experts=1, shared_mix="gate")
    gate.load_state_dict(add.state_dict(), strict=False)
    y_gate, _, _ = gate(x, RouteContext())
    c = gate.shared_gate(x).softmax(-1)
    torch.testing.assert_close(y_gate, c[:, :1] * routed + c[:, 1:] * add.shared(x))


def test_weighted_loss_uses_recipe_weights():
    layer = _layer(aux_loss_weight=0.5, z_loss_weight=0.0)
    _, _, rec = layer(torch.randn(8, 16), RouteContext())
    torch.testing.assert_close(rec.loss, 0.5 * rec.losses["load_balance"])


def test_counters_sum_over_forwards_and_shares_divide_by_their_denominator():
    """Counters are summed over a window; "name/den" is reported as name = sum / sum of den, and
    den itself is not reported; a share whose denominator is 0 is left out."""
    from dataclasses import replace

    from moectl.core.stats import RoutingAccumulator

    layer = _layer()
    _, _, rec = layer(torch.randn(6, layer.experts.d_model), RouteContext())
    acc = RoutingAccumulator()
    for hits, n in ((3.0, 10.0), (1.0, 30.0)):
        acc.add([replace(rec, counters={"events": 1, "hits/n": torch.tensor(hits), "n": n, "miss/none": 1.0,
                                        "none": 0.0})])
    out = acc.summary(lambda t: t)
    assert out["events"] == 2 and out["hits"] == 4 / 40
    assert not {"n", "hits/n", "none", "miss", "miss/none"} & set(out)
