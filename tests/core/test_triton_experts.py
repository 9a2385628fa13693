"""The Triton expert backend against the loop, forward and backward (on CPU through Triton's
interpreter, TRITON_INTERPRET=1, which tests/conftest.py sets when there is no GPU)."""

from __future__ import annotations

import pytest
import torch

from moectl.core import triton_experts
from moectl.core.experts import ExpertBank, run_experts, triton_usable

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(not triton_experts.AVAILABLE, reason="triton is not installed")]
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not triton_experts.interpreted() else "cpu")


def _banks(activation="swiglu", E=5, D=24, F=40, dtype=torch.float32):
    torch.manual_seed(0)
    ref = ExpertBank(E, D, F, activation, "loop")
    ref.init_weights(0.3, 0.3)
    fast = ExpertBank(E, D, F, activation, "triton")
    fast.load_state_dict(ref.state_dict())
    return ref.to(DEVICE, dtype), fast.to(DEVICE, dtype)


def _run(bank, x, ids, w, valid, probe):
    xi = x.clone().requires_grad_(True)
    wi = w.clone().requires_grad_(True)
    for p in bank.parameters():
        p.grad = None
    y, counts = run_experts(bank, xi, ids, wi * valid if valid is not None else wi, valid)
    (y.float() * probe).sum().backward()
    return y.detach().float(), counts, xi.grad.float(), wi.grad.float(), [p.grad.float() for p in bank.parameters()]


CASES = {
    "jagged": lambda T, K, E, g: torch.multinomial(1.0 / torch.arange(1, E + 1).float().expand(T, E), K, generator=g),
    "empty experts": lambda T, K, E, g: torch.randint(0, 2, (T, K), generator=g) * 2,   # only 0 and 2 used
    "one expert takes all": lambda T, K, E, g: torch.full((T, K), 3),
    "uniform": lambda T, K, E, g: (torch.arange(T).unsqueeze(1) * K + torch.arange(K)) % E,
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("K", [1, 2])
def test_triton_matches_loop(case, activation, K):
    assert triton_usable(DEVICE) is None
    ref, fast = _banks(activation)
    g = torch.Generator().manual_seed(K)
    T = 45   # not a multiple of any block size
    ids = CASES[case](T, K, 5, g).to(DEVICE)
    x = torch.randn(T, 24, generator=g).to(DEVICE)
    w = torch.rand(T, K, generator=g).to(DEVICE)
    probe = torch.randn(T, 24, generator=g).to(DEVICE)
    out_r = _run(ref, x, ids, w, None, probe)
    out_f = _run(fast, x, ids, w, None, probe)
    assert out_f[1].tolist() == out_r[1].tolist()
    for a, b in zip([out_f[0], out_f[2], out_f[3], *out_f[4]], [out_r[0], out_r[2], out_r[3], *out_r[4]], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if case == "empty experts":
        for e in (1, 3, 4):
            assert (out_f[4][0][e] == 0).all()


def test_triton_with_dropped_slots():
    """Slots the capacity limit drops (valid false) take no expert and contribute nothing."""
    ref, fast = _banks()
    g = torch.Generator().manual_seed(3)
    T, K = 33, 2
    ids = torch.randint(0, 5, (T, K), generator=g).to(DEVICE)
    valid = (torch.rand(T, K, generator=g) > 0.4).to(DEVICE)
    x = torch.randn(T, 24, generator=g).to(DEVICE)
    w = torch.rand(T, K, generator=g).to(DEVICE)
    probe = torch.randn(T, 24, generator=g).to(DEVICE)
    out_r, out_f = _run(ref, x, ids, w, valid, probe), _run(fast, x, ids, w, valid, probe)
    for a, b in zip([out_f[0], out_f[2], out_f[3], *out_f[4]], [out_r[0], out_r[2], out_r[3], *out_r[4]], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert torch.isfinite(a).all()


@pytest.mark.skipif(triton_experts.interpreted(), reason="Triton's interpreter gets bf16 dot products wrong "
                    "(a plain bf16 tl.dot returns garbage there); this runs on a GPU")
def test_triton_bf16_close_to_fp32_loop():
    ref, _ = _banks()
    _, fast = _banks(dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    T, K = 40, 2
    ids = CASES["jagged"](T, K, 5, g).to(DEVICE)
    x = torch.randn(T, 24, generator=g).to(DEVICE)
    w = torch.rand(T, K, generator=g).to(DEVICE)
    y_ref, _ = run_experts(ref, x, ids, w, None)
    y, _ = run_experts(fast, x.bfloat16(), ids, w, None)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - y_ref).norm() / y_ref.norm()).item() < 2e-2


def test_block_table_never_straddles_experts():
    counts = torch.tensor([0, 70, 1, 0, 32, 33])
    expert, start, end = triton_experts.block_table(counts, 32, int(counts.sum()))
    offsets = [0, *counts.cumsum(0).tolist()]
    seen = torch.zeros(int(counts.sum()), dtype=torch.long)
    for e, s, t in zip(expert.tolist(), start.tolist(), end.tolist(), strict=True):
        if e < 0:
            assert s == t == 0
            continue
        assert offsets[e] <= s < offsets[e + 1] and t == offsets[e + 1]
        seen[s:min(s + 32, t)] += 1
    assert (seen == 1).all()   # every slot in exactly one block
    assert (expert >= 0).sum().item() == sum((c + 31) // 32 for c in counts.tolist())


def test_triton_falls_back_with_a_warning_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(triton_experts, "interpreted", lambda: False)
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the kernels can run")
    ref, fast = _banks()
    x = torch.randn(6, 24)
    ids = torch.randint(0, 5, (6, 2))
    w = torch.rand(6, 2)
    with pytest.warns(UserWarning, match="triton cannot run"):
        y, _ = run_experts(fast.cpu(), x, ids, w, None)
    torch.testing.assert_close(y, run_experts(ref.cpu(), x, ids, w, None)[0])
