"""CartesianMoE against a literal, token-by-token reference of the two routed sub-layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moectl.core import MoETransformer
from moectl.core.model import CartesianMLP
from moectl.core.moe import RoutedFFN
from moectl.core.routers import RouteContext
from tests.core.helpers import tiny_args


def _cartesian(shared_mix="gate"):
    torch.manual_seed(0)
    args = tiny_args(block="cartesian", shared_experts=1, shared_mix=shared_mix, backend="loop")
    index = iter(range(2))
    mlp = CartesianMLP(args, 0, lambda name: RoutedFFN(args, next(index), name))
    for m in mlp.modules():
        if hasattr(m, "init_weights"):
            m.init_weights(0.3, 0.3)
    with torch.no_grad():  # non-trivial norm weights
        mlp.norm_a.weight.uniform_(0.5, 1.5)
        mlp.norm_b.weight.uniform_(0.5, 1.5)
    return mlp


def _rms(x, w, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def _sublayer_reference(x, ffn, mix):
    """One routed sub-layer, written out per token."""
    out = []
    for t in range(x.shape[0]):
        p = torch.softmax(x[t] @ ffn.router.weight.t(), -1)
        top = torch.topk(p, 2)
        g = top.values / top.values.sum()
        m = sum(g[j] * _swiglu(x[t], ffn.experts.w1[e], ffn.experts.w3[e], ffn.experts.w2[e])
                for j, e in enumerate(top.indices.tolist()))
        s = ffn.shared
        shared = _swiglu(x[t], s.w1.weight.t(), s.w3.weight.t(), s.w2.weight.t())
        if mix == "gate":
            c = torch.softmax(ffn.shared_gate.weight @ x[t] + ffn.shared_gate.bias, -1)
            out.append(c[0] * m + c[1] * shared)
        else:
            out.append(m + shared)
    return torch.stack(out)


def _reference(h, mlp, mix):
    """h_mid = h + A(norm_A(h)); out = h_mid + B(norm_B(h_mid))."""
    h_mid = h + _sublayer_reference(_rms(h, mlp.norm_a.weight), mlp.moe_a, mix)
    return h_mid + _sublayer_reference(_rms(h_mid, mlp.norm_b.weight), mlp.moe_b, mix)


def test_forward_and_backward_match_reference():
    for mix in ("gate", "add"):
        mlp = _cartesian(mix)
        h = torch.randn(1, 7, 32, requires_grad=True)
        out, _, records = mlp(h, RouteContext(), None)
        ref = _reference(h[0], mlp, mix)
        torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ref)
        grads = torch.autograd.grad((out[0] * g).sum(), [h, *mlp.parameters()])
        ref_grads = torch.autograd.grad((ref * g).sum(), [h, *mlp.parameters()], allow_unused=True)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), rtol=1e-4, atol=5e-5)
        assert [r.name for r in records] == ["L0a", "L0b"]   # one balance loss per router


def test_parameter_matching_with_smoe_share():
    """N half-width sub-experts per set (+ one half-width shared) = N full-width experts (+ one shared):
    the same expert parameters, plus one router, one gate and one norm per block."""
    d, N, D = 32, 4, 64
    share = MoETransformer(tiny_args(expert_hidden=D, num_experts=N, shared_experts=1, shared_mix="gate"))
    cart = MoETransformer(tiny_args(expert_hidden=D // 2, num_experts=N, shared_experts=1, shared_mix="gate",
                                    block="cartesian"))

    def count(model, word):
        return sum(p.numel() for n, p in model.named_parameters() if word in n)

    assert count(cart, "experts") + count(cart, "shared.") == count(share, "experts") + count(share, "shared.")
    extra = sum(p.numel() for p in cart.parameters()) - sum(p.numel() for p in share.parameters())
    assert extra == 2 * (d * N + (2 * d + 2) + d)   # 2 MoE layers: router, gate, norm each


def test_model_with_cartesian_blocks_trains():
    model = MoETransformer(tiny_args(block="cartesian"))
    x = torch.randint(0, 64, (2, 16))
    out = model(x, x)
    assert [r.name for r in out.records] == ["L0a", "L0b", "L1a", "L1b"]
    assert [layer.index for layer in model.routed_layers()] == [0, 1, 2, 3]
    out.total_loss.backward()
    assert all(p.grad is not None for p in model.parameters())
