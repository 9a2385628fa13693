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


# --------------------------------------------------------------------------- balance-loss choices
# Hand-computed values on four tokens, three experts, two sequences of two tokens.

P4 = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.6, 0.2, 0.2]])
IDS4 = torch.tensor([[0, 1], [1, 0], [2, 0], [0, 1]])


def _spec(form, pooling="batch"):
    from moectl.core.losses import BalanceSpec
    return BalanceSpec(form, pooling)


def test_switch_over_all_slots_hand_value():
    from moectl.core.losses import balance_loss
    # slots: expert 0 x4, 1 x3, 2 x1 of 8 -> f = (.5, .375, .125); P = (.35, .3, .35)
    expected = 3 * (0.5 * 0.35 + 0.375 * 0.3 + 0.125 * 0.35)
    assert abs(balance_loss(P4, IDS4, _spec("switch")).item() - expected) < 1e-6


def test_switch_over_first_choices_hand_value():
    from moectl.core.losses import balance_loss
    # first choices 0, 1, 2, 0 -> f = (.5, .25, .25); P = (.35, .3, .35)
    expected = 3 * (0.5 * 0.35 + 0.25 * 0.3 + 0.25 * 0.35)
    assert abs(balance_loss(P4, IDS4, _spec("switch_top1")).item() - expected) < 1e-6


def test_entropy_form_hand_value_and_range():
    import math

    from moectl.core.losses import balance_loss
    P = (0.35, 0.3, 0.35)
    expected = sum(p * math.log(p) for p in P)
    assert abs(balance_loss(P4, IDS4, _spec("entropy")).item() - expected) < 1e-6
    uniform = torch.full((4, 3), 1 / 3)
    assert abs(balance_loss(uniform, IDS4, _spec("entropy")).item() + math.log(3)) < 1e-6
    collapsed = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    assert balance_loss(collapsed, IDS4, _spec("entropy")).item() == 0.0


def test_per_sequence_pooling_hand_values():
    import math

    from moectl.core.losses import balance_loss
    # sequence 1: tokens 0-1, P = (.35, .45, .2), slots 0,1,1,0 -> f = (.5, .5, 0)
    # sequence 2: tokens 2-3, P = (.35, .15, .5), slots 2,0,0,1 -> f = (.5, .25, .25)
    s1 = 3 * (0.5 * 0.35 + 0.5 * 0.45)
    s2 = 3 * (0.5 * 0.35 + 0.25 * 0.15 + 0.25 * 0.5)
    got = balance_loss(P4, IDS4, _spec("switch", "sequence"), seq_len=2).item()
    assert abs(got - (s1 + s2) / 2) < 1e-6
    e1 = sum(p * math.log(p) for p in (0.35, 0.45, 0.2))
    e2 = sum(p * math.log(p) for p in (0.35, 0.15, 0.5))
    got = balance_loss(P4, IDS4, _spec("entropy", "sequence"), seq_len=2).item()
    assert abs(got - (e1 + e2) / 2) < 1e-6
    # first choices per sequence: (0, 1) and (2, 0)
    t1 = 3 * (0.5 * 0.35 + 0.5 * 0.45)
    t2 = 3 * (0.5 * 0.35 + 0.5 * 0.5)
    got = balance_loss(P4, IDS4, _spec("switch_top1", "sequence"), seq_len=2).item()
    assert abs(got - (t1 + t2) / 2) < 1e-6
    # one sequence of all the tokens is batch pooling without a count reducer
    whole = balance_loss(P4, IDS4, _spec("switch", "sequence"), seq_len=4)
    assert abs(whole.item() - balance_loss(P4, IDS4, _spec("switch")).item()) < 1e-6


def test_per_sequence_pooling_ignores_the_count_reducer_and_keeps_gradients():
    from moectl.core.losses import balance_loss
    probs = P4.clone().requires_grad_(True)
    doubled = balance_loss(probs, IDS4, _spec("switch", "sequence"), seq_len=2, reduce=lambda c: 2 * c + 1)
    plain = balance_loss(probs, IDS4, _spec("switch", "sequence"), seq_len=2)
    assert torch.equal(doubled, plain)
    (g,) = torch.autograd.grad(plain, probs)
    assert g.abs().sum() > 0


def test_unknown_balance_choices_are_refused():
    import pytest
    with pytest.raises(ValueError, match="balance form"):
        _spec("gshard")
    with pytest.raises(ValueError, match="pooling"):
        _spec("switch", "token")


def test_entropy_form_has_a_finite_gradient_at_a_collapse():
    from moectl.core.losses import balance_loss
    collapsed = torch.tensor([[1.0, 0.0, 0.0]] * 4, requires_grad=True)
    (g,) = torch.autograd.grad(balance_loss(collapsed, IDS4, _spec("entropy", "sequence"), seq_len=2), collapsed)
    assert torch.isfinite(g).all()


def test_per_sequence_pooling_refuses_tokens_that_are_not_whole_sequences():
    import pytest

    from moectl.core.losses import balance_loss
    with pytest.raises(ValueError, match="not sequences of 3"):
        balance_loss(P4, IDS4, _spec("switch", "sequence"), seq_len=3)
