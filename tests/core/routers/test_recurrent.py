"""RMoE's recurrent router against a reference loop over layers built on torch.nn.GRUCell, and the
recurrent gradient through depth."""

from __future__ import annotations

import pytest
import torch

from moectl.core import MoETransformer
from moectl.core.routers import RouteContext, make_router
from moectl.core.routers.recurrent import RecurrentCore
from tests.core.helpers import router_args, tiny_args

D, E, K, P, L, T = 12, 6, 2, 8, 3, 5


def _chain(**opts):
    """L recurrent routers sharing one core, as a model builds them."""
    torch.manual_seed(0)
    args = router_args("recurrent", d_model=D, num_experts=E, top_k=K, hidden=P, **opts)
    routers = [make_router(args, index=i) for i in range(L)]
    core = type(routers[0]).shared_module(args)
    for m in (*routers, core):
        m.init_weights(0.4, 0.4)
    return routers, core


def _run(routers, core, xs):
    state, outs = None, []
    for router, x in zip(routers, xs, strict=True):
        out = router(x, RouteContext(shared=core), state)
        outs.append(out)
        state = out.state
    return outs


def _gru_by_hand(x, h, cell):
    """torch.nn.GRUCell's equations, written out."""
    gi = x @ cell.weight_ih.t() + cell.bias_ih
    gh = h @ cell.weight_hh.t() + cell.bias_hh
    r = torch.sigmoid(gi[:, :P] + gh[:, :P])
    z = torch.sigmoid(gi[:, P:2 * P] + gh[:, P:2 * P])
    n = torch.tanh(gi[:, 2 * P:] + r * gh[:, 2 * P:])
    return (1 - z) * n + z * h


def test_matches_reference_loop_over_layers():
    routers, core = _chain(projector_bias=True)
    xs = [torch.randn(T, D, requires_grad=True) for _ in range(L)]
    outs = _run(routers, core, xs)
    ref_cell = torch.nn.GRUCell(P, P)
    ref_cell.load_state_dict(core.cell.state_dict())
    h = torch.zeros(T, P)
    ref_logits = []
    for router, x in zip(routers, xs, strict=True):
        xp = x @ router.projector.weight.t() + router.projector.bias
        h_next = ref_cell(xp, h)
        torch.testing.assert_close(h_next, _gru_by_hand(xp, h, ref_cell))
        h = h_next
        ref_logits.append(h @ router.weight.t())
    for out, ref in zip(outs, ref_logits, strict=True):
        torch.testing.assert_close(out.logits_TE, ref)
        top = ref.softmax(-1).topk(K)
        assert torch.equal(out.expert_ids_TK, top.indices)
        torch.testing.assert_close(out.weights_TK, top.values / top.values.sum(-1, keepdim=True))
    # Backward: the same gradients for every input and parameter.
    g = [torch.randn(T, E) for _ in range(L)]
    ours = torch.autograd.grad(sum((o.logits_TE * gi).sum() for o, gi in zip(outs, g, strict=True)),
                               [*xs, routers[0].projector.weight, core.cell.weight_hh])
    ref_grads = torch.autograd.grad(sum((r * gi).sum() for r, gi in zip(ref_logits, g, strict=True)),
                                    [*xs, routers[0].projector.weight, ref_cell.weight_hh])
    for a, b in zip(ours, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _first_projector_grad(**opts):
    routers, core = _chain(**opts)
    xs = [torch.randn(T, D) for _ in range(L)]
    outs = _run(routers, core, xs)
    outs[-1].aux_losses["load_balance"].backward()     # only the LAST layer's router loss
    return routers[0].projector.weight.grad


def test_recurrent_gradient_reaches_earlier_layers():
    grad = _first_projector_grad()
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("opts", [{"detach_state": True}, {"pass_state": False}])
def test_no_recurrent_gradient_when_detached_or_stateless(opts):
    grad = _first_projector_grad(**opts)
    assert grad is None or grad.abs().sum() == 0


def test_detach_keeps_forward():
    xs = [torch.randn(T, D) for _ in range(L)]
    a = _run(*_chain(), xs)
    b = _run(*_chain(detach_state=True), xs)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.logits_TE, y.logits_TE)


def test_stateless_and_logit_residual():
    routers, core = _chain(pass_state=False, logit_residual=0.5)
    xs = [torch.randn(T, D) for _ in range(L)]
    outs = _run(routers, core, xs)
    for i, (router, x) in enumerate(zip(routers, xs, strict=True)):
        h = core.cell(x @ router.projector.weight.t(), torch.zeros(T, P))
        expected = h @ router.weight.t() + (0.5 * outs[i - 1].logits_TE if i else 0)
        torch.testing.assert_close(outs[i].logits_TE, expected)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_other_cells(cell):
    routers, core = _chain(cell=cell)
    ref = {"rnn": torch.nn.RNNCell, "lstm": torch.nn.LSTMCell}[cell](P, P)
    ref.load_state_dict(core.cell.state_dict())
    xs = [torch.randn(T, D) for _ in range(L)]
    outs = _run(routers, core, xs)
    h = c = torch.zeros(T, P)
    for router, x, out in zip(routers, xs, outs, strict=True):
        xp = x @ router.projector.weight.t()
        if cell == "lstm":
            h, c = ref(xp, (h, c))
        else:
            h = ref(xp, h)
        torch.testing.assert_close(out.logits_TE, h @ router.weight.t())


def test_shared_projector():
    routers, core = _chain(shared_projector=True)
    assert all(r.projector is None for r in routers) and isinstance(core, RecurrentCore)
    assert core.projector is not None
    outs = _run(routers, core, [torch.randn(T, D) for _ in range(L)])
    assert all(torch.isfinite(o.logits_TE).all() for o in outs)


@pytest.mark.parametrize("block", ["standard", "cartesian"])
def test_in_model_state_advances_once_per_routed_layer(block):
    model = MoETransformer(tiny_args(router_kind="recurrent", router_options={"hidden": 8}, block=block))
    calls = []
    model.router_shared.cell.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randint(0, 64, (2, 16))
    out = model(x, x)
    assert len(calls) == len(model.routed_layers()) == len(out.records)
    out.total_loss.backward()
    assert model.router_shared.cell.weight_hh.grad.abs().sum() > 0


def test_dense_layers_pass_the_state_on():
    """MoE on layers 0 and 2 of 3: the router of layer 2 continues from layer 0's state (the dense
    layer 1 leaves it untouched)."""
    import dataclasses

    args = tiny_args(router_kind="recurrent", router_options={"hidden": 8}, layers=[0, 2])
    model = MoETransformer(dataclasses.replace(args, n_layers=3))
    seen = []
    for layer in model.routed_layers():
        layer.router.register_forward_hook(lambda mod, inp, out: seen.append((inp[2], out.state)))
    model(torch.randint(0, 64, (2, 16)))
    (state_in_0, state_out_0), (state_in_2, _) = seen
    assert state_in_0 is None and state_in_2 is state_out_0


def test_activation_checkpointing_same_routing():
    torch.manual_seed(0)
    model = MoETransformer(tiny_args(router_kind="recurrent", router_options={"hidden": 8}, block="cartesian"))
    x = torch.randint(0, 64, (2, 16))
    ref = model(x, x)
    ref.total_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing = True
    out = model(x, x)
    out.total_loss.backward()
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    assert len(out.records) == len(ref.records)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-6)


def test_flops_count_the_cell():
    r = make_router(router_args("recurrent", d_model=D, num_experts=E, top_k=K, hidden=P))
    assert r.flops_per_token() == 2 * D * P + 12 * P * P + 2 * P * E
