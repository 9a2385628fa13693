"""Group-limited routing and the routed scaling factor (DeepSeek-V2/V3), on the `topk` and the
recurrent router alike, against a per-token reference written from the formula:

    s = sigmoid(W x) (or softmax), c = s + b (selection bias)
    group score_g = sum of the two largest c in group g (top2_sum) or the largest (max)
    keep the topk_groups best groups; experts = the top-k of c among the kept groups
    weights = s[experts], divided by their sum when renormalising, times routed_scaling
"""

from __future__ import annotations

import pytest
import torch

from moectl.core.routers import RouteContext, make_router
from tests.core.helpers import router_args


def reference(logits_TE, bias_E, score_func, groups, topk_groups, group_score, top_k, renormalize, scale):
    scores = logits_TE.sigmoid() if score_func == "sigmoid" else logits_TE.softmax(-1)
    E = scores.shape[1]
    size = E // groups
    ids_out, w_out = [], []
    for t in range(scores.shape[0]):
        c = [float(scores[t, e] + bias_E[e]) for e in range(E)]
        group_scores = []
        for g in range(groups):
            members = sorted(c[g * size:(g + 1) * size], reverse=True)
            group_scores.append(members[0] + members[1] if group_score == "top2_sum" else members[0])
        kept = sorted(range(groups), key=lambda g: -group_scores[g])[:topk_groups]
        allowed = [e for e in range(E) if e // size in kept]
        experts = sorted(allowed, key=lambda e: -c[e])[:top_k]
        w = [float(scores[t, e]) for e in experts]
        if renormalize:
            w = [v / sum(w) for v in w]
        ids_out.append(experts)
        w_out.append([v * scale for v in w])
    return ids_out, w_out


CASES = [
    dict(score_func="sigmoid", groups=4, topk_groups=2, group_score="top2_sum", renormalize=True, routed_scaling=2.5),
    dict(score_func="sigmoid", groups=4, topk_groups=1, group_score="max", renormalize=False, routed_scaling=1.0),
    dict(score_func="softmax", groups=2, topk_groups=1, group_score="max", renormalize=True, routed_scaling=16.0),
]


@pytest.mark.parametrize("kind", ["topk", "recurrent"])
@pytest.mark.parametrize("case", CASES, ids=["v3", "v2-max", "softmax-scaled"])
def test_group_limited_routing_matches_the_formula(kind, case):
    torch.manual_seed(0)
    r = make_router(router_args(kind, d_model=8, num_experts=8, top_k=2, selection_bias=True, **case))
    r.init_weights(1.0, 1.0)
    with torch.no_grad():
        r.expert_bias.copy_(torch.randn(8) * 0.1)
    x = torch.randn(16, 8)
    ctx = RouteContext()
    if kind == "recurrent":   # the cell all layers share
        ctx = RouteContext(shared=type(r).shared_module(router_args(kind, d_model=8, num_experts=8, top_k=2, **case)))
        ctx.shared.init_weights(1.0, 1.0)
    out = r(x, ctx)
    ids, w = reference(out.logits_TE.detach(), r.expert_bias, case["score_func"], case["groups"], case["topk_groups"],
                       case["group_score"], 2, case["renormalize"], case["routed_scaling"])
    got = [dict(zip(i, v, strict=True)) for i, v in zip(out.expert_ids_TK.tolist(), out.weights_TK.tolist(),
                                                          strict=True)]
    want = [dict(zip(i, v, strict=True)) for i, v in zip(ids, w, strict=True)]
    for g, wnt in zip(got, want, strict=True):
        assert set(g) == set(wnt)
        for e in g:
            assert abs(g[e] - wnt[e]) <= 1e-6 * max(1.0, abs(wnt[e]))
    # the kept groups really limit the choice: no token's experts span more groups than allowed
    size = 8 // case["groups"]
    assert all(len({e // size for e in row}) <= case["topk_groups"] for row in out.expert_ids_TK.tolist())


def test_matches_transformers_dots1_gate():
    """The same numbers as transformers' own DeepSeek-V3-style gate (dots1's) on the same weights."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.dots1.modeling_dots1 import Dots1TopkRouter

    cfg = transformers.Dots1Config(hidden_size=8, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                                   norm_topk_prob=True, routed_scaling_factor=2.5)
    theirs = Dots1TopkRouter(cfg)
    torch.manual_seed(0)
    ours = make_router(router_args("topk", d_model=8, num_experts=8, top_k=3, score_func="sigmoid", selection_bias=True,
                                   groups=4, topk_groups=2, routed_scaling=2.5))
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(8, 8))
        theirs.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
        ours.weight.copy_(theirs.weight)
        ours.expert_bias.copy_(theirs.e_score_correction_bias)
    x = torch.randn(32, 8)
    _, w_theirs, ids_theirs = theirs(x)
    out = ours(x, RouteContext())
    a = torch.zeros(32, 8).scatter(1, ids_theirs, w_theirs)
    b = torch.zeros(32, 8).scatter(1, out.expert_ids_TK, out.weights_TK)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("opts", "words"), [
    (dict(groups=3), "router.groups"),
    (dict(groups=4, topk_groups=5), "router.topk_groups"),
    (dict(groups=8), "router.group_score"),
    (dict(groups=4, topk_groups=1), "top_k"),
    (dict(topk_groups=2), "has no effect without groups"),
])
def test_impossible_group_settings_are_refused(opts, words, write, cli):
    import json

    text = ("name: g\nmodel:\n  vocab_size: 64\n  d_model: 16\n  n_layers: 1\n  n_heads: 2\n  ffn_hidden: 32\n"
            "  seq_len: 16\n  moe:\n    num_experts: 8\n    top_k: 3\n    expert_hidden: 16\n"
            f"    router: {json.dumps({'kind': 'topk', **opts})}\n")
    r = cli("recipes", "validate", write("g.yaml", text))
    assert r.exit_code == 2 and words in r.output, r.output


def test_build_reports_the_groups(write, cli):
    text = ("name: g\nmodel:\n  vocab_size: 64\n  d_model: 16\n  n_layers: 1\n  n_heads: 2\n  ffn_hidden: 32\n"
            "  seq_len: 16\n  moe:\n    num_experts: 8\n    top_k: 2\n    expert_hidden: 16\n"
            "    router: {kind: topk, score_func: sigmoid, groups: 4, topk_groups: 2, routed_scaling: 2.5}\n")
    r = cli("build", write("g.yaml", text))
    assert r.exit_code == 0, r.output
    assert "4 groups of 2 experts" in r.output and "scaled by 2.5" in r.output
