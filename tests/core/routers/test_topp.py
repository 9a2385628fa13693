from __future__ import annotations

import torch

from moectl.core.routers.topp import topp_select


def test_threshold_semantics():
    probs = torch.tensor([[0.05, 0.3, 0.25, 0.4],     # 0.4 alone is not > 0.4 -> add 0.3
                          [0.9, 0.05, 0.03, 0.02],    # first expert already exceeds p
                          [0.25, 0.25, 0.25, 0.25]])  # 0.25, 0.5 -> two
    ids, w, valid = topp_select(probs, p=0.4, max_k=4)
    assert valid.sum(-1).tolist() == [2, 1, 2]
    assert ids[0, :2].tolist() == [3, 1]
    torch.testing.assert_close(w[0], torch.tensor([0.4, 0.3, 0.0, 0.0]))   # raw, not renormalised
    assert ids[1, 0].item() == 0


def test_max_k_caps():
    probs = torch.full((1, 8), 1 / 8)
    ids, w, valid = topp_select(probs, p=0.99, max_k=3)
    assert ids.shape == (1, 3) and valid.all()
