"""The three methods end to end: paper parameter counts, every tiny paper recipe training through
`moectl train`, the methods combined, and CompeteSMoE's schedule across resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moectl.core.compete import CompetitionSchedule
from moectl.factory import build_model
from moectl.recipe.load import load_recipe
from moectl.train.optim import make_optimizer
from moectl.train.step import TrainStep
from moectl.train.trainer import train
from tests.conftest import REPO, train_recipe_text
from tests.train.helpers import losses

TINY = sorted((REPO / "recipes" / "papers").rglob("*-tiny.yaml"))


def _params(cli, name):
    result = cli("build", f"papers/{name}", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["params"]


@pytest.mark.parametrize("size, total, active", [("base", 842e6, 247e6), ("large", 2.88e9, 770e6)])
def test_cartesian_matches_paper_and_smoe_share(cli, size, total, active):
    cart = _params(cli, f"cartesianmoe/cartesian-{size}")
    share = _params(cli, f"cartesianmoe/smoe-share-{size}")
    for p in (cart, share):
        assert abs(p["total"] / total - 1) < 0.005 and abs(p["active"] / active - 1) < 0.005
    # Identical expert parameters; the extra router, gate and norm are under 0.02%.
    assert abs(cart["total"] / share["total"] - 1) < 2e-4 and abs(cart["active"] / share["active"] - 1) < 5e-4
    experts = lambda p: p["components"]["experts"]["total"] + p["components"]["shared_experts"]["total"]
    assert experts(cart) == experts(share)


def test_rmoe_router_parameters(cli):
    """0.91B: the recurrent router adds about 3.5-3.6M parameters over linear routers; enwik8 medium:
    0.47M recurrent vs 0.04M linear router parameters."""
    extra = _params(cli, "rmoe/rmoe-0.9b")["total"] - _params(cli, "rmoe/smoe-0.9b")["total"]
    assert 3.5e6 < extra < 3.7e6
    rmoe = _params(cli, "rmoe/rmoe-enwik8")["components"]["router"]["total"]
    smoe = _params(cli, "rmoe/smoe-enwik8")["components"]["router"]["total"]
    assert abs(rmoe / 0.47e6 - 1) < 0.02 and 0.04e6 <= smoe < 0.05e6


def test_every_paper_recipe_has_a_tiny_variant():
    full = [p for p in (REPO / "recipes" / "papers").rglob("*.yaml") if not p.name.endswith("-tiny.yaml")]
    assert len(full) >= 30
    for p in full:
        assert p.with_name(p.stem + "-tiny.yaml").is_file(), p


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_tiny_recipe_builds_and_takes_a_training_step(path):
    """Every tiny paper recipe builds, and one step of the trainer's own step (forward, backward,
    clipping, AdamW) on random tokens gives a finite loss, a finite gradient for every parameter and
    new weights."""
    rec = load_recipe(path)
    model = build_model(rec).train()
    model.make_plan(rec.seed, 10)
    optimizer = make_optimizer(model, rec.train)
    step = TrainStep(model, model, optimizer, device=torch.device("cpu"), bf16=False, grad_clip=rec.train.grad_clip)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, rec.model.vocab_size, (2, rec.model.seq_len + 1), generator=g)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {}
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=name: grads.__setitem__(n, p.grad.clone()))
             for name, p in model.named_parameters()]
    try:
        outcome = step([(tokens[:, :-1], tokens[:, 1:])], 0)
    finally:
        for h in hooks:
            h.remove()
    assert outcome.stepped and math.isfinite(outcome.loss) and math.isfinite(outcome.grad_norm)
    assert set(grads) == set(before), sorted(set(before) - set(grads))   # every parameter got a gradient
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert len(changed) > 0.9 * len(before)


# A few tiny recipes train for real, through the command line: one per method.
REAL_RUNS = ["cartesianmoe/cartesian-base-tiny", "rmoe/rmoe-enwik8-tiny", "competesmoe/competesmoe-154m-tiny"]


@pytest.mark.train
@pytest.mark.parametrize("name", REAL_RUNS)
def test_tiny_recipe_trains(cli, name, tmp_path):
    result = cli("train", f"papers/{name}", "train.max_steps=2", "train.warmup_steps=0", "train.eval_batches=1",
                 "train.batch_size=2", "data.max_documents=300", "data.val_fraction=0.05",
                 "--run-dir", tmp_path / "run", "-q")
    assert result.exit_code == 0, result.output
    assert losses(tmp_path / "run").keys() == {2}


COMBOS = {
    "cartesian+recurrent": ["model.moe.block=cartesian", "model.moe.router.kind=recurrent"],
    "cartesian+competition": ["model.moe.block=cartesian", "model.moe.competition.rate=1.0"],
    "recurrent+competition": ["model.moe.router.kind=recurrent", "model.moe.competition.rate=1.0"],
    "all three": ["model.moe.block=cartesian", "model.moe.router.kind=recurrent", "model.moe.competition.rate=1.0",
                  "train.activation_checkpointing=true"],
    "all three, 2024 competition": ["model.moe.block=cartesian", "model.moe.router.kind=recurrent",
                                    "model.moe.competition.rate=0.5", "model.moe.competition.schedule=bernoulli",
                                    "model.moe.competition.response=l2_norm", "model.moe.competition.gate=softmax"],
}


@pytest.mark.train
@pytest.mark.parametrize("name", sorted(COMBOS))
def test_methods_combine(name, corpus, write, tmp_path):
    path = write("r.yaml", train_recipe_text(corpus, max_steps=4, eval_every="null"))
    overrides = [*COMBOS[name], "model.moe.competition.warmup=0.0" if "competition" in name else "seed=0"]
    train(load_recipe(path, overrides), run_dir=tmp_path / "run", resume="never", show_progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "train"]
    assert len(steps) == 4 and all(r["loss"] == r["loss"] for r in steps)   # finite, not NaN
    if "competition.rate=1.0" in " ".join(COMBOS[name]):
        assert all(r["competitions"] >= 1 and r["extra_flops_per_token"] > 0 for r in steps)


@pytest.mark.train
def test_competition_schedule_resumes_identically(corpus, write, tmp_path):
    """A run resumed from a checkpoint competes at the same (layer, step) pairs: per-step losses
    after the resume equal the uninterrupted run's."""
    text = train_recipe_text(corpus, max_steps=12, checkpoint_every=6, eval_every=6)
    path = write("r.yaml", text)
    overrides = ["model.moe.competition.rate=0.3", "model.moe.competition.warmup=0.1",
                 "model.moe.competition.max_layers=1"]
    rec = load_recipe(path, overrides)
    train(rec, run_dir=tmp_path / "a", resume="never", show_progress=False)
    train(rec, run_dir=tmp_path / "b", resume=str(tmp_path / "a" / "checkpoints" / "step-00000006"),
          show_progress=False)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(7, 13))
    assert {s: a[s] for s in b} == b
    competed = _competitions(tmp_path / "a")
    assert max(competed.values()) <= 1 and sum(competed.values()) >= 2 and competed[1] == 0   # cap, some, warm-up
    # The schedule comes from the checkpoint, not from the seed: a run resumed with another seed
    # (allowed from another run folder; the split seed stays, so the tokenizer does) still competes
    # where the first run planned to.
    train(load_recipe(path, [*overrides, "seed=5", "data.split_seed=0"]), run_dir=tmp_path / "c",
          resume=str(tmp_path / "a" / "checkpoints" / "step-00000006"), show_progress=False)
    assert _competitions(tmp_path / "c") == {s: competed[s] for s in range(7, 13)}
    other = CompetitionSchedule(5, 12, 2, 0.3, 0.1, 1)
    assert [len(other.at(s - 1)) for s in range(7, 13)] != [competed[s] for s in range(7, 13)]


def _competitions(run) -> dict[int, int]:
    """step -> layers that competed in it (log_every=1)."""
    records = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r.get("competitions", 0) for r in records if r["type"] == "train"}
