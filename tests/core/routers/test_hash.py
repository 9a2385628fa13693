from __future__ import annotations

import torch

from moectl.core.routers import RouteContext, make_router
from tests.core.helpers import router_args


def _router(index=0, seed=0):
    r = make_router(router_args("hash", d_model=8, num_experts=8, top_k=2, vocab_size=30, seed=seed), index)
    r.init_weights(0.02, 0.02)
    return r


def test_routing_depends_on_token_id_only():
    r = _router()
    ids = torch.tensor([3, 7, 3, 3])
    out = r(torch.randn(4, 8), RouteContext(token_ids_T=ids))
    again = r(torch.randn(4, 8), RouteContext(token_ids_T=ids))
    assert torch.equal(out.expert_ids_TK, again.expert_ids_TK)
    assert torch.equal(out.expert_ids_TK[0], out.expert_ids_TK[2])
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.ones(4))


def test_table_is_seeded_and_saved():
    assert torch.equal(_router().table, _router().table)
    assert not torch.equal(_router(index=0).table, _router(index=1).table)
    assert not torch.equal(_router(seed=0).table, _router(seed=1).table)
    assert "table" in _router().state_dict()
    assert not list(_router().parameters())
