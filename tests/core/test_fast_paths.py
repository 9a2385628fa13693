"""Fast paths against their plain references: the chunked, fused LM-head loss and the
permutation-aware dispatch/combine of routed slots."""

from __future__ import annotations

import pytest
import torch

from moectl.core import losses
from moectl.core.experts import (
    _Combine,
    _Dispatch,
    combine_reference,
    dispatch_reference,
    sort_slots,
)
from moectl.core.losses import head_cross_entropy, head_cross_entropy_reference


def _grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    out = fn()
    out.backward(torch.tensor(0.7))   # not 1, so the incoming gradient's scaling is checked
    return out.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("chunk", [5, 16, 1000])
@pytest.mark.parametrize("ignored", [False, True])
def test_head_cross_entropy_matches_reference(monkeypatch, chunk, ignored):
    monkeypatch.setattr(losses, "_chunk_rows", lambda vocab: chunk)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 24, generator=g, requires_grad=True)
    w = (torch.randn(50, 24, generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, 50, (37,), generator=g)
    if ignored:
        y[::3] = -100
    ref, ref_g = _grads(lambda: head_cross_entropy_reference(h, w, y), h, w)
    out, out_g = _grads(lambda: head_cross_entropy(h, w, y), h, w)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(out_g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_head_cross_entropy_all_ignored_is_zero():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss = head_cross_entropy(h, w, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and (h.grad == 0).all() and (w.grad == 0).all()


def test_head_cross_entropy_bf16_autocast_close():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = (torch.randn(40, 32, generator=g) * 0.2).requires_grad_()
    y = torch.randint(0, 40, (64,), generator=g)
    ref, ref_g = _grads(lambda: head_cross_entropy_reference(h, w, y), h, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_g = _grads(lambda: head_cross_entropy(h, w, y), h, w)
    assert out.dtype == torch.float32 and abs(out.item() - ref.item()) < 2e-2
    for a, b in zip(out_g, ref_g, strict=True):
        assert a.dtype == torch.float32
        assert (a - b).norm() / b.norm() < 3e-2


def test_head_cross_entropy_without_grad_keeps_nothing():
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    y = torch.randint(0, 10, (6,))
    with torch.no_grad():
        torch.testing.assert_close(head_cross_entropy(h, w, y), head_cross_entropy_reference(h, w, y))


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("invalid", [False, True])
def test_dispatch_and_combine_match_reference(K, invalid):
    g = torch.Generator().manual_seed(K)
    T, D, E = 11, 8, 5
    ids = torch.randint(0, E, (T, K), generator=g)
    ids[:, 0] = 2   # one expert takes every token's first slot
    valid = (torch.rand(T, K, generator=g) > 0.3) if invalid else None
    order, counts = sort_slots(ids, valid, E)
    assert counts.tolist() == torch.bincount(ids[valid] if invalid else ids.reshape(-1), minlength=E).tolist()
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    x = torch.randn(T, D, generator=g, requires_grad=True)
    y = torch.randn(T * K, D, generator=g, requires_grad=True)
    w = torch.rand(T, K, generator=g, requires_grad=True)
    probe = torch.randn(T * K, D, generator=g)
    ref, ref_g = _grads(lambda: (dispatch_reference(x, order, K) * probe).sum(), x)
    out, out_g = _grads(lambda: (_Dispatch.apply(x, order, inverse, K) * probe).sum(), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out_g[0], ref_g[0])
    probe = torch.randn(T, D, generator=g)
    ref, ref_g = _grads(lambda: (combine_reference(y, w, order) * probe).sum(), y, w)
    out, out_g = _grads(lambda: (_Combine.apply(y, w, order, inverse) * probe).sum(), y, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(out_g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rope_complex_form_matches_the_reference():
    from moectl.core.layers import apply_rope, apply_rope_reference, rope_tables

    cos, sin = rope_tables(12, 8, 10000.0, torch.device("cpu"), {"kind": "linear", "factor": 2.0})
    x = torch.randn(2, 3, 12, 8, requires_grad=True)
    g = torch.randn(2, 3, 12, 8)
    (apply_rope(x, cos, sin) * g).sum().backward()
    fast = x.grad.clone()
    x.grad = None
    (apply_rope_reference(x, cos, sin) * g).sum().backward()
    torch.testing.assert_close(apply_rope(x, cos, sin), apply_rope_reference(x, cos, sin), rtol=0, atol=1e-6)
    torch.testing.assert_close(fast, x.grad, rtol=0, atol=1e-6)
    odd = torch.randn(2 * 3 * 12 * 8 + 1)[1:].view(2, 3, 12, 8)   # pairs not aligned as complex numbers
    torch.testing.assert_close(apply_rope(odd, cos, sin), apply_rope_reference(odd, cos, sin))
    xb = x.detach().bfloat16()
    assert apply_rope(xb, cos, sin).dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_zero_tokens_route_to_nothing(backend):
    from moectl.core.experts import ExpertBank, run_experts

    bank = ExpertBank(4, 16, 32, "swiglu", backend)
    bank.init_weights(0.1, 0.1)
    x = torch.randn(0, 16, requires_grad=True)
    y, counts = run_experts(bank, x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), None)
    y.sum().backward()
    assert y.shape == (0, 16) and counts.tolist() == [0, 0, 0, 0] and x.grad.shape == (0, 16)


def test_combine_keeps_the_experts_dtype_under_cpu_autocast():
    from moectl.core.experts import ExpertBank, run_experts

    bank = ExpertBank(4, 16, 32, "swiglu", "grouped_mm")
    bank.init_weights(0.1, 0.1)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = run_experts(bank, x, torch.randint(0, 4, (8, 2)), torch.rand(8, 2), None)
    assert y.dtype == torch.float32
