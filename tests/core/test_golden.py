"""RMoE's router and CompeteSMoE's layer against numbers the authors' released code computed
(tests/core/golden/README.md): every stored output, loss and gradient, at the fixtures' tolerance.

Each check also runs once against a model with one formula perturbed (the GRU's gate order, the
competition's response), and must fail there: these tests pin the formulas, not just run them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moectl.core import ModelArgs, MoEArgs, registry
from moectl.core.compete import CompeteFFN, CompetitionOptions, competition_gates, responses
from moectl.core.moe import RoutedFFN
from moectl.core.routers import RouteContext

GOLDEN = Path(__file__).parent / "golden"


def close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """The fixtures' tolerance: max |got - ref| <= 1e-5 * max |ref|; integer ids identical."""
    got = got.detach()
    if not ref.is_floating_point():
        assert torch.equal(got, ref), f"{what}: {got.tolist()} != {ref.tolist()}"
        return
    scale = ref.abs().max().item()
    torch.testing.assert_close(got.to(ref.dtype), ref, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- RMoE


def rmoe_checks(f: dict[str, torch.Tensor], swap_gru_gates: bool = False) -> list[tuple[str, torch.Tensor]]:
    """Build moectl's recurrent router over three routed layers from the fixture and return every
    (name, value) the fixture stores, computed by moectl. `swap_gru_gates` exchanges the GRU's reset
    and update gate rows, a wrong gate order."""
    ropt = registry.routers.get("recurrent").options(hidden=8)
    args = ModelArgs(vocab_size=64, d_model=16, n_layers=3, n_heads=4, ffn_hidden=32, seq_len=16,
                     moe=MoEArgs(num_experts=4, top_k=2, expert_hidden=12, layers=[0, 1, 2], backend="loop",
                                 aux_loss_weight=0.01, z_loss_weight=0.0, router=ropt))
    layers = [RoutedFFN(args, index=i) for i in range(3)]
    core = type(layers[0].router).shared_module(args)
    cell = {k[len("core."):]: v.clone() for k, v in f.items() if k.startswith("core.")}
    if swap_gru_gates:
        for k, v in cell.items():
            r, z, n = v.chunk(3, 0)
            cell[k] = torch.cat([z, r, n])
    core.load_state_dict(cell, strict=True)
    for i, layer in enumerate(layers):
        p = f"layers.{i}."
        layer.load_state_dict({k[len(p):]: v for k, v in f.items() if k.startswith(p)}, strict=True)

    checks, inputs, state, loss = [], [], None, 0.0
    ctx = RouteContext(shared=core)
    for i, layer in enumerate(layers):
        u = f[f"input.u.{i}"].clone().requires_grad_(True)
        inputs.append(u)
        out = layer.router(u, ctx, state)
        y, state, _ = layer(u, ctx, state)
        probs = state.logits_TE.softmax(-1)
        loss = loss + (probs * f[f"loss.gp.{i}"]).sum() + (y * f[f"loss.gy.{i}"]).sum()
        checks += [(f"ref.logits.{i}", state.logits_TE), (f"ref.probs.{i}", out.probs_TE),
                   (f"ref.topk_ids.{i}", out.expert_ids_TK), (f"ref.topk_weights.{i}", out.weights_TK),
                   (f"ref.state.{i}", state.h_TP), (f"ref.y.{i}", y)]
    checks.append(("ref.loss", loss))
    params = {f"core.{k}": v for k, v in core.named_parameters()}
    for i, layer in enumerate(layers):
        params.update({f"layers.{i}.{k}": v for k, v in layer.named_parameters()})
    wanted = {k[len("grad."):] for k in f if k.startswith("grad.") and not k.startswith("grad.input.")}
    assert wanted == set(params), "the fixture's gradients and moectl's parameters differ"
    names = sorted(wanted)
    grads = torch.autograd.grad(loss, [params[n] for n in names] + inputs)
    checks += [(f"grad.{n}", g) for n, g in zip(names, grads[:len(names)], strict=True)]
    checks += [(f"grad.input.u.{i}", g) for i, g in enumerate(grads[len(names):])]
    return checks


@pytest.fixture(scope="module")
def golden() -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(GOLDEN / f"{name}.safetensors") for name in ("rmoe", "competesmoe")}


def assert_matches(checks: list[tuple[str, torch.Tensor]], fixture: dict[str, torch.Tensor]) -> None:
    """Every stored output and gradient is checked, and each one agrees."""
    assert {name for name, _ in checks} == {k for k in fixture if k.startswith(("ref.", "grad."))}
    for name, got in checks:
        close(got, fixture[name], name)


def failures(checks: list[tuple[str, torch.Tensor]], fixture: dict[str, torch.Tensor]) -> set[str]:
    """The stored values that `checks` miss."""
    failed = set()
    for name, got in checks:
        try:
            close(got, fixture[name], name)
        except AssertionError:
            failed.add(name)
    return failed


def test_rmoe_matches_the_authors_code(golden):
    assert_matches(rmoe_checks(golden["rmoe"]), golden["rmoe"])


def test_rmoe_golden_catches_a_wrong_gate_order(golden):
    failed = failures(rmoe_checks(golden["rmoe"], swap_gru_gates=True), golden["rmoe"])
    assert {"ref.state.0", "ref.logits.0", "grad.core.cell.weight_ih"} <= failed


# --------------------------------------------------------------------------- CompeteSMoE


def compete_layer(f: dict[str, torch.Tensor], response: str = "mean_softplus") -> CompeteFFN:
    copt = CompetitionOptions(rate=1.0, warmup=0.0, theta=0.2, response=response, gate="linear", target="all",
                              router_loss_weight=1.0, diversity_weight=1.0, balance_weight=0.0)
    args = ModelArgs(vocab_size=64, d_model=16, n_layers=1, n_heads=4, ffn_hidden=32, seq_len=16, activation="relu",
                     moe=MoEArgs(num_experts=8, top_k=2, expert_hidden=12, layers=[0], backend="loop",
                                 aux_loss_weight=0.01, z_loss_weight=0.001,
                                 router=registry.routers.get("topk").options(), variant=copt))
    layer = CompeteFFN(args, index=0)
    layer.load_state_dict({k: v for k, v in f.items() if k.startswith(("router.", "experts."))}, strict=True)
    return layer.train()


def compete_checks(f: dict[str, torch.Tensor], response: str = "mean_softplus") -> list[tuple[str, torch.Tensor]]:
    """Every (name, value) the CompeteSMoE fixture stores, computed by moectl's CompeteFFN."""
    layer = compete_layer(f, response)
    params = dict(layer.named_parameters())
    names = ["router.weight", "experts.w1", "experts.w2"]
    assert set(params) == set(names)
    checks = []

    # A competition step: the plan names routed layer 0.
    x = f["input.x"].clone().requires_grad_(True)
    y, _, rec = layer(x, RouteContext(plan=frozenset({0})))
    assert rec.counters["competitions"] == 1
    loss = (y * f["loss.g_compete"]).sum() + rec.loss
    with torch.no_grad():
        out = layer.router(x, RouteContext())
        s = responses(layer.experts.forward_all(x), response)
        win, w = competition_gates(s, 2, "linear")
        o_TED = layer.experts.forward_all(x).transpose(0, 1)
        winner_outputs = o_TED.gather(1, win.unsqueeze(-1).expand(-1, -1, o_TED.shape[-1]))
    checks += [("ref.compete.gate_logits", out.logits_TE), ("ref.compete.gate_probs", out.probs_TE),
               ("ref.compete.responses", s), ("ref.compete.response_softmax", s.softmax(-1)),
               ("ref.compete.winner_ids", win), ("ref.compete.winner_weights", w),
               ("ref.compete.winner_outputs", winner_outputs), ("ref.compete.y", y),
               ("ref.compete.router_distill", rec.losses["router_distill"]),
               ("ref.compete.diversity", rec.losses["diversity"]), ("ref.compete.loss", loss)]
    grads = torch.autograd.grad(loss, [params[n] for n in names] + [x])
    checks += [(f"grad.compete.{n}", g) for n, g in zip(names + ["input.x"], grads, strict=True)]

    # An ordinary step: no layer competes.
    x = f["input.x"].clone().requires_grad_(True)
    y, _, rec = layer(x, RouteContext(plan=frozenset()))
    assert "competitions" not in rec.counters
    loss = (y * f["loss.g_normal"]).sum()
    out = layer.router(x, RouteContext())
    checks += [("ref.normal.gate_ids", out.expert_ids_TK), ("ref.normal.gate_weights", out.weights_TK),
               ("ref.normal.y", y), ("ref.normal.loss", loss)]
    grads = torch.autograd.grad(loss, [params[n] for n in names] + [x])
    checks += [(f"grad.normal.{n}", g) for n, g in zip(names + ["input.x"], grads, strict=True)]
    return checks


def test_competesmoe_matches_the_authors_code(golden):
    assert_matches(compete_checks(golden["competesmoe"]), golden["competesmoe"])


def test_competesmoe_golden_catches_another_response(golden):
    failed = failures(compete_checks(golden["competesmoe"], response="l2_norm"), golden["competesmoe"])
    assert {"ref.compete.responses", "ref.compete.y", "ref.compete.router_distill"} <= failed
    assert not any(name.startswith("ref.normal.") for name in failed)   # the ordinary step does not compete
