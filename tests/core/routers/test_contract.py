"""The router contract, checked for every registered router (a new router is tested on arrival)."""

from __future__ import annotations

import pytest
import torch

from moectl.core.routers import RouteContext, make_router, router_registry
from tests.core.helpers import router_args

KINDS = sorted(router_registry())
T, D, E, K, V = 40, 16, 8, 2, 50


SHARED: dict[str, torch.nn.Module | None] = {}


def _router(kind: str):
    """The router and, built the way the model builds it, the module all its layers share."""
    torch.manual_seed(0)
    args = router_args(kind, d_model=D, num_experts=E, top_k=K, vocab_size=V)
    router = make_router(args, index=1)
    router.init_weights(0.5, 0.5)
    shared = type(router).shared_module(args)
    if shared is not None:
        shared.init_weights(0.5, 0.5)
    SHARED[kind] = shared
    return router


def _inputs(kind: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    ctx = RouteContext(token_ids_T=torch.randint(0, V, (T,), generator=g), shared=SHARED[kind])
    return x, ctx


def test_registry_has_baselines():
    assert {"topk", "expert_choice", "hash", "topp", "recurrent"} <= set(KINDS)


def test_registry_matches_recipe_schema():
    """Every registered router can be chosen in a recipe, and every recipe kind has a router."""
    from moectl.recipe.load import model_types
    from moectl.recipe.schema import moe_schema

    sections = model_types(moe_schema().model_fields["router"].annotation)
    assert {cls.model_fields["kind"].default for cls in sections} == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_router_contract(kind):
    router = _router(kind).train()
    x, ctx = _inputs(kind)
    out = router(x, ctx)
    ids, w, probs = out.expert_ids_TK, out.weights_TK, out.probs_TE
    k = ids.shape[1]
    assert ids.dtype == torch.int64 and ids.shape == (T, k) and k >= 1
    assert w.shape == (T, k) and w.dtype == torch.float32
    assert probs.shape == (T, E) and probs.dtype == torch.float32
    assert ((ids >= 0) & (ids < E)).all()
    assert (w >= 0).all() and torch.isfinite(w).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(T))
    valid = out.valid_TK if out.valid_TK is not None else torch.ones_like(ids, dtype=torch.bool)
    assert (w[~valid] == 0).all()
    for t in range(T):  # a token never uses the same expert twice
        chosen = ids[t][valid[t]]
        assert chosen.unique().numel() == chosen.numel()
    if router.fixed_k:
        assert k == K and valid.all()
    for name, loss in out.aux_losses.items():
        assert loss.dim() == 0 and torch.isfinite(loss), name
    if out.logits_TE is not None:
        assert out.logits_TE.shape == (T, E) and out.logits_TE.dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
def test_router_gradients(kind):
    router = _router(kind)
    x, ctx = _inputs(kind)
    out = router(x, ctx)
    objective = out.weights_TK.sum() + sum(out.aux_losses.values(), torch.zeros(()))
    params = list(router.parameters())
    if not params:
        assert not out.weights_TK.requires_grad  # nothing learned (hash)
        return
    objective.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("kind", KINDS)
def test_router_deterministic_in_eval(kind):
    router = _router(kind).eval()
    x, ctx = _inputs(kind)
    a, b = router(x, ctx), router(x, ctx)
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    assert torch.equal(a.weights_TK, b.weights_TK)


@pytest.mark.parametrize("kind", KINDS)
def test_router_builds_on_meta(kind):
    with torch.device("meta"):
        router = make_router(router_args(kind, d_model=D, num_experts=E, top_k=K, vocab_size=V))
        router.init_weights(0.02, 0.02)
    assert all(p.is_meta for p in router.parameters())
