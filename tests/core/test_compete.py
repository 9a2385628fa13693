"""CompeteSMoE against a hand-written competition, its losses, its gradients and its schedule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moectl.core import MoETransformer
from moectl.core.compete import (
    BernoulliCompetition,
    CompeteFFN,
    CompetitionOptions,
    CompetitionSchedule,
    place_draws,
)
from moectl.core.routers import RouteContext
from tests.core.helpers import tiny_args

E, K, D, H, T = 5, 2, 8, 12, 6


def _layer(**comp):
    torch.manual_seed(0)
    layer = CompeteFFN(tiny_args(competition=CompetitionOptions(**comp), d_model=D, num_experts=E, top_k=K,
                                 expert_hidden=H, backend="loop"))
    for m in layer.modules():
        if hasattr(m, "init_weights"):
            m.init_weights(0.5, 0.5)
    layer.train()
    return layer


def _expert(layer, e, x):
    b = layer.experts
    return (F.silu(x @ b.w1[e]) * (x @ b.w3[e])) @ b.w2[e]


COMPETE = RouteContext(plan=frozenset({0}))


@pytest.mark.parametrize("response, gate", [("mean_softplus", "linear"), ("l2_norm", "softmax")])
def test_competition_matches_hand_computation(response, gate):
    layer = _layer(response=response, gate=gate, theta=0.2)
    x = torch.randn(T, D, requires_grad=True)
    y, _, rec = layer(x, COMPETE)
    ref, ref_losses = [], {"distill": 0.0, "div": 0.0}
    outs = torch.stack([_expert(layer, e, x) for e in range(E)], 1)                  # [T, E, D]
    s = F.softplus(outs).mean(-1) if response == "mean_softplus" else outs.norm(dim=-1)
    p_router = (x @ layer.router.weight.t()).softmax(-1)
    p_comp = s.softmax(-1).detach()
    for t in range(T):
        win = torch.topk(s[t], K).indices
        w = s[t, win] / s[t, win].sum() if gate == "linear" else s[t, win].softmax(-1)
        ref.append((w[:, None] * outs[t, win]).sum(0))
        sims = [F.cosine_similarity(outs[t, i], outs[t, j], dim=0) for i in win for j in win if i != j]
        ref_losses["div"] += sum(sims) / K**2 / T
    ref = torch.stack(ref)
    win = s.topk(K, -1).indices
    distill = F.mse_loss(p_router, p_comp) + 0.2 * F.mse_loss(p_router.gather(1, win), p_comp.gather(1, win))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rec.losses["router_distill"], distill.detach())
    torch.testing.assert_close(rec.losses["diversity"], ref_losses["div"].detach())
    f = torch.bincount(win[:, 0], minlength=E).float() / T
    torch.testing.assert_close(rec.losses["compete_balance"], (E * (f * s.softmax(-1).mean(0)).sum()).detach())
    assert set(rec.losses) == {"router_distill", "diversity", "compete_balance"}
    # Agreement counts: the router's own top-K for the same tokens against the winners.
    chosen = p_router.topk(K, -1).indices
    top1 = float((chosen[:, 0] == win[:, 0]).sum())
    overlap = sum(len(set(chosen[t].tolist()) & set(win[t].tolist())) / K for t in range(T))
    assert rec.counters["competitions"] == 1 and float(rec.counters["compete_tokens"]) == T
    assert float(rec.counters["compete_agree_top1/compete_tokens"]) == top1
    assert float(rec.counters["compete_agree_overlap/compete_tokens"]) == pytest.approx(overlap)
    # Gradients reach the experts through both outputs and responses, as in the reference.
    g = torch.randn_like(ref)
    ours = torch.autograd.grad((y * g).sum(), [x, layer.experts.w1, layer.experts.w2])
    theirs = torch.autograd.grad((ref * g).sum(), [x, layer.experts.w1, layer.experts.w2])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_strongest_expert_wins():
    """Experts with known responses: all compute the same function scaled by c_e, so under the L2
    response expert e responds c_e * |o|; the two largest c win every token with known weights."""
    layer = _layer(response="l2_norm", gate="linear")
    c = torch.tensor([1.0, 4.0, 2.0, 5.0, 3.0])
    with torch.no_grad():
        for e in range(E):
            layer.experts.w1[e] = layer.experts.w1[0]
            layer.experts.w3[e] = layer.experts.w3[0]
            layer.experts.w2[e] = c[e] * layer.experts.w2[0]
    x = torch.randn(T, D)
    y, _, rec = layer(x, COMPETE)
    assert rec.load_E.tolist() == [0, T, 0, T, 0]
    base = _expert(layer, 0, x)
    torch.testing.assert_close(y, (5 / 9 * 5 + 4 / 9 * 4) * base, rtol=1e-5, atol=1e-6)


def test_router_gets_no_task_gradient_in_competition():
    layer = _layer()
    x = torch.randn(T, D)
    y, _, rec = layer(x, COMPETE)
    y.square().sum().backward(retain_graph=True)      # any task loss
    assert layer.router.weight.grad is None or (layer.router.weight.grad == 0).all()
    assert layer.experts.w1.grad.abs().sum() > 0
    rec.loss.backward()                                 # the weighted method losses
    assert layer.router.weight.grad.abs().sum() > 0
    # An ordinary step trains the router through the task loss.
    layer.zero_grad()
    y, _, rec = layer(x, RouteContext())
    assert not rec.counters and "load_balance" in rec.losses
    y.square().sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_competition_balance_loss_trains_the_experts():
    """L_bal's P is the undetached softmax of the responses: it reaches the experts."""
    layer = _layer(router_loss_weight=0.0, diversity_weight=0.0, balance_weight=1.0)
    _, _, rec = layer(torch.randn(T, D), COMPETE)
    rec.loss.backward()
    assert layer.experts.w2.grad.abs().sum() > 0
    assert layer.router.weight.grad is None or (layer.router.weight.grad == 0).all()


def test_never_competes_in_eval_or_without_grad():
    layer = _layer()
    x = torch.randn(T, D)
    assert layer(x, COMPETE)[2].counters["competitions"] == 1
    with torch.no_grad():
        assert not layer(x, COMPETE)[2].counters
    layer.eval()
    assert not layer(x, COMPETE)[2].counters
    layer.train()
    assert not layer(x, RouteContext())[2].counters   # not scheduled


def test_schedule_cap_warmup_and_seed():
    s = CompetitionSchedule(seed=1, total_steps=2000, num_layers=12, rate=0.2, warmup=0.1, max_layers=3)
    per_step = s.mask.sum(1)
    assert per_step.max() <= 3
    assert per_step[:200].sum() == 0
    again = CompetitionSchedule(seed=1, total_steps=2000, num_layers=12, rate=0.2, warmup=0.1, max_layers=3)
    assert torch.equal(s.mask, again.mask)
    other = CompetitionSchedule(seed=2, total_steps=2000, num_layers=12, rate=0.2, warmup=0.1, max_layers=3)
    assert not torch.equal(s.mask, other.mask)
    # With a cap above the expected count, draws stay where they fell: about rate * layers * steps.
    loose = CompetitionSchedule(seed=1, total_steps=2000, num_layers=12, rate=0.05, warmup=0.0, max_layers=12)
    assert abs(loose.mask.float().mean().item() - 0.05) < 0.01
    # Draws over the cap move to the nearest earlier step with room, so capped steps fill up.
    tight = CompetitionSchedule(seed=0, total_steps=50, num_layers=4, rate=1.0, warmup=0.0, max_layers=2)
    assert (tight.mask.sum(1) == 2).all()
    state = s.state_dict()
    fresh = CompetitionSchedule(seed=9, total_steps=10, num_layers=1, rate=0.5, warmup=0, max_layers=1)
    fresh.load_state_dict(state)
    assert fresh.at(1500) == s.at(1500) and fresh.at(99999) == frozenset()


def test_draws_move_to_the_nearest_earlier_step_with_room_else_later():
    """A hand-built draw pattern with a cap of 2 layers per step and a warm-up of 1 step."""
    draws = torch.zeros(6, 4, dtype=torch.bool)
    draws[2, :4] = True        # two too many at step 2: move to step 1 (earlier), then to step 3 (later)
    draws[1, 0] = True         # layer 0 already at step 1
    draws[4, [1, 2, 3]] = True  # one too many at step 4: layer 3 is already at step 3, steps 2 and 1 are
    #                             full, step 0 is warm-up -> step 5
    mask = place_draws(draws, first=1, cap=2)
    assert mask.sum(1).tolist() == [0, 2, 2, 1, 2, 1]
    assert mask[2].tolist() == [True, True, False, False]      # the first two drawn stay
    assert mask[1].tolist() == [True, False, True, False]      # layer 2 moved back one step
    assert mask[3].tolist() == [False, False, False, True]     # layer 3: step 1 full, so forward
    assert mask[4].tolist() == [False, True, True, False] and mask[5].tolist() == [False, False, False, True]
    assert mask[0].sum() == 0                                   # never into the warm-up
    # A draw with no room anywhere is dropped.
    assert place_draws(torch.ones(2, 3, dtype=torch.bool), first=0, cap=1).sum() == 2


def test_crowded_schedule_fills_every_step():
    """Far more draws than room (24 layers at rate 0.5, cap 3): every step holds the cap. (At this
    size a placement that rescans full steps takes hours; `place_draws` jumps over them.)"""
    s = CompetitionSchedule(seed=0, total_steps=20_000, num_layers=24, rate=0.5, warmup=0.0, max_layers=3)
    assert (s.mask.sum(1) == 3).all()


def test_bernoulli_draws_agree_across_processes_and_resume():
    """The 2024 schedule: fresh draws per forward from the run's seed, so two processes (two
    instances with one seed) draw the same layers; warm-up respected; state restores the stream."""
    a, b = (BernoulliCompetition(seed=3, total_steps=100, num_layers=8, rate=0.3, warmup=0.1) for _ in range(2))
    draws_a = [a.at(step) for step in range(100) for _ in range(2)]   # two micro-batches a step
    assert draws_a == [b.at(step) for step in range(100) for _ in range(2)]
    assert all(d == frozenset() for d in draws_a[:20])
    assert draws_a[20:40] != draws_a[40:60] and 0.2 < sum(map(len, draws_a[20:])) / (180 * 8) < 0.4
    saved = a.state_dict()
    fresh = BernoulliCompetition(seed=99, total_steps=100, num_layers=8, rate=0.3, warmup=0.1)
    assert fresh.resume(saved) is None
    assert [fresh.at(50) for _ in range(5)] == [a.at(50) for _ in range(5)]
    assert "not this run's" in CompetitionSchedule(1, 100, 8, 0.3, 0.1, 3).resume(saved)   # another kind: not taken


def test_model_follows_schedule():
    model = MoETransformer(tiny_args(competition=CompetitionOptions(rate=0.5, warmup=0.0, max_layers=1)))
    assert isinstance(model.make_plan(seed=0, total_steps=20), CompetitionSchedule)
    assert torch.equal(model.plan.mask, CompetitionSchedule(0, 20, 2, 0.5, 0.0, 1).mask)
    x = torch.randint(0, 64, (2, 16))
    for step in range(20):
        out = model(x, x, step=step)
        assert {i for i, r in enumerate(out.records) if r.counters} == model.plan.at(step)
    model.eval()
    assert not any(r.counters for r in model(x, x, step=3).records)


def test_bernoulli_draw_once_per_forward_under_recomputation():
    """With activation checkpointing the layers run twice; the draw happens once, before, so the
    recomputed forward competes exactly where the first did and the stream advances once."""
    model = MoETransformer(tiny_args(competition=CompetitionOptions(schedule="bernoulli", rate=0.5, warmup=0.0)))
    model.activation_checkpointing = True
    model.plan = BernoulliCompetition(0, 10, 2, 0.5, 0.0)
    twin = BernoulliCompetition(0, 10, 2, 0.5, 0.0)
    x = torch.randint(0, 64, (2, 16))
    for step in range(6):
        out = model(x, x, step=step)
        out.total_loss.backward()
        assert {i for i, r in enumerate(out.records) if r.counters} == twin.at(step)


def test_extra_flops_reported_apart():
    layer = _layer()
    _, _, rec = layer(torch.randn(T, D), COMPETE)
    assert rec.extra_flops == T * (E - K) * 3 * 2 * D * H
    assert layer.flops_per_token() == 2 * D * E + K * 3 * 2 * D * H   # model FLOPs stay nominal


def test_winners_target_is_the_softmax_over_the_winners_alone():
    """The 2024 code's distillation target: softmax of the winners' scores, 0 for every other expert."""
    layer = _layer(response="l2_norm", gate="softmax", target="winners", theta=0.0)
    x = torch.randn(T, D)
    _, _, rec = layer(x, COMPETE)
    outs = torch.stack([_expert(layer, e, x) for e in range(E)], 1)
    s = outs.norm(dim=-1)
    win = s.topk(K, -1).indices
    target = torch.zeros(T, E).scatter(1, win, s.gather(1, win).softmax(-1))
    assert torch.allclose(target.sum(-1), torch.ones(T)) and (target > 0).sum() == T * K
    p_router = (x @ layer.router.weight.t()).softmax(-1)
    torch.testing.assert_close(rec.losses["router_distill"], F.mse_loss(p_router, target).detach())


def test_combined_gate_scores_with_the_router_logit():
    """combine_gate: score = (response + router logit) / 2 picks the winners and weighs them."""
    layer = _layer(response="l2_norm", gate="softmax", combine_gate=True, theta=0.0, target="winners")
    x = torch.randn(T, D)
    y, _, rec = layer(x, COMPETE)
    outs = torch.stack([_expert(layer, e, x) for e in range(E)], 1)
    score = 0.5 * outs.norm(dim=-1) + 0.5 * (x @ layer.router.weight.t())
    val, win = score.topk(K, -1)
    ref = (val.softmax(-1)[..., None] * outs.gather(1, win[..., None].expand(-1, -1, D))).sum(1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    # The response alone would pick other winners for some token here, so the logit matters.
    assert not torch.equal(outs.norm(dim=-1).topk(K, -1).indices.sort(-1).values, win.sort(-1).values)


def test_combined_gate_needs_softmax_gates(write):
    from moectl.errors import MoectlError
    from moectl.recipe.load import load_recipe
    from tests.conftest import REPO

    with pytest.raises(MoectlError, match="gate: softmax"):
        load_recipe(REPO / "recipes/papers/competesmoe/competesmoe-154m-tiny.yaml",
                    ["model.moe.competition.combine_gate=true"])
