"""The expert backends agree with the plain loop, forward and backward."""

from __future__ import annotations

import pytest
import torch

from moectl.core.experts import (
    ExpertBank,
    experts_grouped,
    experts_loop,
    grouped_mm_available,
    run_experts,
)


def _bank(activation="swiglu", E=6, d=16, f=24, backend="loop", dtype=torch.float32):
    torch.manual_seed(0)
    bank = ExpertBank(E, d, f, activation, backend).to(dtype)
    bank.init_weights(0.3, 0.3)
    return bank


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 2, 0, 4], [0, 0, 0, 0, 0, 7], [1, 1, 1, 1, 1, 1]])
@pytest.mark.parametrize("tail", [0, 3])
def test_grouped_matches_loop(activation, counts, tail):
    bank = _bank(activation)
    counts_E = torch.tensor(counts)
    n = sum(counts) + tail                       # `tail` unused rows after the last expert
    x = torch.randn(n, 16)
    # The grouped kernel itself must run here (torch >= 2.8 has it on CPU), not its loop fallback.
    assert grouped_mm_available(x, bank.w1, bank.w2)
    grad = torch.randn(n, 16)
    results = []
    for fn in (experts_loop, experts_grouped):
        xi = x.clone().requires_grad_(True)
        for p in bank.parameters():
            p.grad = None
        y = fn(xi, counts_E, bank.w1, bank.w3, bank.w2, bank.act)
        (y * grad).sum().backward()
        results.append((y.detach(), xi.grad, [p.grad.clone() for p in bank.parameters()]))
    (y0, gx0, gw0), (y1, gx1, gw1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    for a, b in zip(gw1, gw0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if tail:
        assert (y1[-tail:] == 0).all() and (y0[-tail:] == 0).all()
    empty = [e for e, c in enumerate(counts) if c == 0]
    for e in empty:  # experts without tokens get exactly zero gradient
        assert (gw1[0][e] == 0).all()


def test_grouped_backward_with_broadcast_gradient():
    """y.sum().backward() hands grouped_mm a zero-stride gradient; it must still work."""
    bank = _bank()
    x = torch.randn(10, 16, requires_grad=True)
    experts_grouped(x, torch.tensor([2, 2, 2, 2, 1, 1]), bank.w1, bank.w3, bank.w2, bank.act).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_grouped_bf16_close_to_fp32():
    bank = _bank(dtype=torch.bfloat16)
    counts = torch.tensor([3, 0, 5, 2, 0, 4])
    x = torch.randn(14, 16).bfloat16()
    y = experts_grouped(x, counts, bank.w1, bank.w3, bank.w2, bank.act).float()
    ref = experts_loop(x.float(), counts, bank.w1.float(), bank.w3.float(), bank.w2.float(), bank.act)
    assert (y - ref).norm() / ref.norm() < 2e-2


def test_fallback_when_grouped_cannot_run():
    bank = _bank(d=6, f=10)   # 6 * 4 bytes is not a multiple of 16: grouped_mm refuses these strides
    x = torch.randn(5, 6)
    assert not grouped_mm_available(x, bank.w1, bank.w2)
    counts = torch.tensor([1, 1, 1, 1, 1, 0])
    with pytest.warns(UserWarning, match="using the loop backend"):
        y = experts_grouped(x, counts, bank.w1, bank.w3, bank.w2, bank.act)
    torch.testing.assert_close(y, experts_loop(x, counts, bank.w1, bank.w3, bank.w2, bank.act))


def test_forward_all_matches_per_expert():
    bank = _bank("gelu")
    x = torch.randn(7, 16)
    y_all = bank.forward_all(x)
    for e in range(bank.num_experts):
        ref = experts_loop(x, torch.tensor([7 if i == e else 0 for i in range(6)]),
                           bank.w1, bank.w3, bank.w2, bank.act)
        torch.testing.assert_close(y_all[e], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_run_experts_matches_token_by_token(backend):
    """Dispatch + experts + combine equal the literal per-token weighted sum, invalid slots ignored."""
    bank = _bank(backend=backend)
    T, K = 9, 3
    x = torch.randn(T, 16)
    ids = torch.randint(0, 6, (T, K))
    w = torch.rand(T, K)
    valid = torch.rand(T, K) > 0.3
    y, counts = run_experts(bank, x, ids, w * valid, valid)
    ref = torch.zeros(T, 16)
    for t in range(T):
        for j in range(K):
            if valid[t, j]:
                e = ids[t, j]
                h = bank.act(x[t] @ bank.w1[e]) * (x[t] @ bank.w3[e])
                ref[t] += w[t, j] * (h @ bank.w2[e])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == torch.bincount(ids[valid], minlength=6).tolist()
