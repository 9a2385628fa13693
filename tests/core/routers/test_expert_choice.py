from __future__ import annotations

import math

import torch

from moectl.core.routers import RouteContext, make_router
from tests.core.helpers import router_args


def test_each_expert_takes_capacity_tokens():
    torch.manual_seed(0)
    r = make_router(router_args("expert_choice", d_model=8, num_experts=4, top_k=2, capacity_factor=1.0))
    r.init_weights(1.0, 1.0)
    x = torch.randn(20, 8)
    out = r(x, RouteContext())
    cap = math.ceil(1.0 * 20 * 2 / 4)
    valid = out.valid_TK
    counts = torch.bincount(out.expert_ids_TK[valid], minlength=4)
    assert counts.tolist() == [cap] * 4
    # The chosen tokens are each expert's highest-probability tokens.
    for e in range(4):
        top = set(out.probs_TE[:, e].topk(cap).indices.tolist())
        got = {t for t in range(20) for j in range(valid.shape[1])
               if valid[t, j] and out.expert_ids_TK[t, j] == e}
        assert got == top
    torch.testing.assert_close(out.weights_TK[valid], out.probs_TE.gather(-1, out.expert_ids_TK)[valid])


def test_capacity_never_exceeds_tokens():
    r = make_router(router_args("expert_choice", d_model=8, num_experts=2, top_k=2, capacity_factor=4.0))
    assert r.capacity(3) == 3
