"""CUDA numerics: the grouped_mm backend against the loop and a float64 reference on the GPU, and
bf16 autocast training of the whole model. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from moectl.core import MoETransformer
from moectl.core.experts import ExpertBank, experts_grouped, experts_loop, grouped_mm_available
from tests.core.helpers import tiny_args

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("counts, tail", [([300, 0, 517, 211, 0, 1, 64, 7], 0), ([0] * 7 + [900], 37)])
def test_grouped_mm_cuda_bf16(counts, tail):
    torch.manual_seed(0)
    bank = ExpertBank(8, 256, 512, "swiglu").cuda().bfloat16()
    bank.init_weights(0.05, 0.05)
    counts_E = torch.tensor(counts, device="cuda")
    n = sum(counts) + tail
    x = torch.randn(n, 256, device="cuda", dtype=torch.bfloat16)
    assert grouped_mm_available(x, bank.w1, bank.w2)
    g = torch.randn(n, 256, device="cuda", dtype=torch.bfloat16)
    outs = []
    for fn in (experts_loop, experts_grouped):
        xi = x.clone().requires_grad_(True)
        for p in bank.parameters():
            p.grad = None
        y = fn(xi, counts_E, bank.w1, bank.w3, bank.w2, bank.act)
        (y.float() * g.float()).sum().backward()
        outs.append((y.detach(), xi.grad, [p.grad.clone() for p in bank.parameters()]))
    ref = experts_loop(x.double().cpu(), counts_E.cpu(), bank.w1.double().cpu(), bank.w3.double().cpu(),
                       bank.w2.double().cpu(), bank.act)
    used = sum(counts)
    assert _rel(outs[1][0][:used].cpu(), ref[:used]) < 1e-2
    assert _rel(outs[1][0], outs[0][0]) < 1e-2
    assert _rel(outs[1][1], outs[0][1]) < 1e-2
    for a, b in zip(outs[1][2], outs[0][2], strict=True):
        assert _rel(a, b) < 2e-2
    if tail:
        assert (outs[1][0][used:] == 0).all() and (outs[1][1][used:] == 0).all()
    for e, c in enumerate(counts):
        if c == 0:
            assert (outs[1][2][0][e] == 0).all()


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_model_bf16_autocast_on_cuda(backend):
    torch.manual_seed(0)
    args = tiny_args(backend=backend, expert_hidden=64)
    args.d_model, args.ffn_hidden = 64, 128
    model = MoETransformer(args).cuda()
    x = torch.randint(0, 64, (4, 16), device="cuda")
    ref = model(x, x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, x)
    out.total_loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) < 2e-2
    assert out.records[0].load_E.sum().item() == 4 * 16 * 2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
