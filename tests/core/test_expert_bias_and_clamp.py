"""Expert biases and GPT-OSS's clamped SwiGLU: every backend against the formula written out."""

from __future__ import annotations

import pytest
import torch

from moectl.core.experts import ExpertBank, experts_grouped, experts_loop, run_experts
from moectl.core.layers import FeedForward, clamped_swiglu


def test_clamped_swiglu_is_gpt_oss():
    g = torch.linspace(-12, 12, 97)
    u = torch.linspace(9, -9, 97)
    gate = g.clamp(max=7.0)
    want = (u.clamp(-7.0, 7.0) + 1) * (gate * torch.sigmoid(gate * 1.702))
    torch.testing.assert_close(clamped_swiglu(g, u), want)


def _bank(activation, bias):
    torch.manual_seed(0)
    bank = ExpertBank(4, 16, 24, activation=activation, bias=bias)
    bank.init_weights(0.5, 0.5)
    if bias:
        with torch.no_grad():
            for b in bank.biases():
                if b is not None:
                    b.normal_(0, 0.5)
    return bank


def reference(bank: ExpertBank, x, e):
    """One expert on rows x, written out."""
    g = x @ bank.w1[e] + (bank.b1[e] if bank.b1 is not None else 0)
    if bank.activation == "swiglu_clamped":
        u = x @ bank.w3[e] + (bank.b3[e] if bank.b3 is not None else 0)
        h = clamped_swiglu(g, u)
    elif bank.w3 is not None:
        h = torch.nn.functional.silu(g) * (x @ bank.w3[e] + (bank.b3[e] if bank.b3 is not None else 0))
    else:
        h = torch.nn.functional.gelu(g)
    return h @ bank.w2[e] + (bank.b2[e] if bank.b2 is not None else 0)


@pytest.mark.parametrize("activation", ["swiglu", "swiglu_clamped", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", [experts_loop, experts_grouped])
def test_backends_with_biases_and_clamps(activation, bias, backend):
    bank = _bank(activation, bias)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(12, 16) * 3            # large enough that the clamps bind
    y = backend(x, counts, bank.w1, bank.w3, bank.w2, bank.act, biases=bank.biases(), glu=bank.glu)
    start = 0
    for e, n in enumerate(counts.tolist()):
        torch.testing.assert_close(y[start:start + n], reference(bank, x[start:start + n], e), rtol=1e-5, atol=1e-5)
        start += n
    assert torch.equal(y[10:], torch.zeros(2, 16))                  # unused rows stay zero


@pytest.mark.parametrize("activation", ["swiglu", "swiglu_clamped"])
def test_every_expert_on_every_token_with_biases(activation):
    bank = _bank(activation, True)
    x = torch.randn(5, 16) * 3
    out = bank.forward_all(x)
    for e in range(4):
        torch.testing.assert_close(out[e], reference(bank, x, e), rtol=1e-5, atol=1e-5)


def test_routed_layer_with_biases_gets_gradients_for_them():
    bank = _bank("swiglu_clamped", True)
    x = torch.randn(6, 16, requires_grad=True)
    ids = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3], [0, 3], [1, 2]])
    y, _ = run_experts(bank, x, ids, torch.rand(6, 2), None)
    y.sum().backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in bank.biases())


def test_dense_ffn_clamped():
    torch.manual_seed(0)
    ffn = FeedForward(16, 24, "swiglu_clamped")
    x = torch.randn(3, 16) * 3
    want = ffn.w2(clamped_swiglu(ffn.w1(x), ffn.w3(x)))
    torch.testing.assert_close(ffn(x), want)
