from __future__ import annotations

import torch

from moectl.core.losses import expert_fractions, load_balance_loss, z_loss


def test_load_balance_perfect_balance_is_one():
    E, T = 8, 64
    probs = torch.full((T, E), 1 / E)
    ids = (torch.arange(T) % E).unsqueeze(-1)
    torch.testing.assert_close(load_balance_loss(probs, ids), torch.tensor(1.0))


def test_load_balance_collapse_is_num_experts():
    E, T = 8, 64
    probs = torch.zeros(T, E)
    probs[:, 3] = 1.0
    ids = torch.full((T, 2), 3)
    torch.testing.assert_close(load_balance_loss(probs, ids), torch.tensor(float(E)))


def test_load_balance_ignores_invalid_slots_and_has_gradient():
    logits = torch.randn(6, 4, requires_grad=True)
    ids = torch.tensor([[0, 1]] * 6)
    valid = torch.tensor([[True, False]] * 6)
    f = expert_fractions(ids, 4, valid)
    assert f.tolist() == [1.0, 0.0, 0.0, 0.0]
    loss = load_balance_loss(logits.softmax(-1), ids, valid)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_z_loss_value():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = ((torch.log(torch.tensor(2.0))) ** 2 + (1 + torch.log(torch.tensor(2.0))) ** 2) / 2
    torch.testing.assert_close(z_loss(logits), expected)
