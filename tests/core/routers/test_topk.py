from __future__ import annotations

import torch

from moectl.core.routers import RouteContext, make_router
from moectl.core.routers.topk import select_topk
from tests.core.helpers import router_args


def _router(**opts):
    torch.manual_seed(0)
    r = make_router(router_args("topk", d_model=8, num_experts=4, top_k=2, **opts))
    r.init_weights(1.0, 1.0)
    return r


def test_select_topk_renormalize():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    ids, w = select_topk(scores, 2, renormalize=True)
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.625, 0.375]]))
    ids, w = select_topk(scores, 2, renormalize=False)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.3]]))


def test_bias_changes_selection_not_weights():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    bias = torch.tensor([1.0, 0.0, 0.0, 0.0])
    ids, w = select_topk(scores, 2, renormalize=False, bias_E=bias)
    assert sorted(ids[0].tolist()) == [0, 1]
    torch.testing.assert_close(w[0].sort().values, torch.tensor([0.1, 0.5]))


def test_softmax_router_matches_hand_computation():
    r = _router(renormalize=False)
    x = torch.randn(5, 8)
    out = r(x, RouteContext())
    probs = (x @ r.weight.t()).softmax(-1)
    torch.testing.assert_close(out.probs_TE, probs)
    top = probs.topk(2, -1)
    assert torch.equal(out.expert_ids_TK, top.indices)
    torch.testing.assert_close(out.weights_TK, top.values)


def test_sigmoid_scores():
    r = _router(score_func="sigmoid", renormalize=False)
    x = torch.randn(5, 8)
    out = r(x, RouteContext())
    s = (x @ r.weight.t()).sigmoid()
    torch.testing.assert_close(out.weights_TK, s.gather(-1, out.expert_ids_TK))
    torch.testing.assert_close(out.probs_TE, s / s.sum(-1, keepdim=True))


def test_aux_free_bias_update_moves_towards_balance():
    r = _router(bias_update_rate=0.1)
    assert "expert_bias" in r.state_dict()
    r.after_step(torch.tensor([10.0, 2.0, 4.0, 4.0]))   # mean 5
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    r2 = _router()                                      # rate 0: no buffer in checkpoints, no update
    assert "expert_bias" not in r2.state_dict()
    r2.after_step(torch.tensor([10.0, 2.0, 4.0, 4.0]))
    assert r2.expert_bias is None                       # nothing to move, nothing moved


def test_jitter_only_in_training():
    r = _router(jitter_eps=0.5)
    x = torch.randn(64, 8)
    r.eval()
    assert torch.equal(r(x, RouteContext()).logits_TE, r(x, RouteContext()).logits_TE)
    r.train()
    assert not torch.equal(r(x, RouteContext()).logits_TE, r(x, RouteContext()).logits_TE)
