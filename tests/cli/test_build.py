"""`moectl build`: parameter counts against the papers, and against the instantiated model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moectl.factory import build_model
from moectl.recipe.load import load_recipe

# CartesianMoE paper, Table 1 (Base): total / activated parameters.
PAPER = {
    "baselines/dense-base": (162e6, 162e6),
    "baselines/smoe-share-base": (842e6, 247e6),
    "baselines/finegrained-base": (842e6, 247e6),
    "baselines/hash-base": (842e6, 247e6),
    "baselines/topp-base": (842e6, 247e6),
}


def _report(cli, *args):
    result = cli("build", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_parameter_counts(cli, name):
    params = _report(cli, name)["params"]
    total, active = PAPER[name]
    assert abs(params["total"] / total - 1) < 0.005
    assert abs(params["active"] / active - 1) < 0.005


def test_top3_matches_total(cli):
    params = _report(cli, "baselines/smoe-top3-base")["params"]
    assert abs(params["total"] / 842e6 - 1) < 0.005


@pytest.mark.parametrize("overrides", [
    [],
    ["model.moe.shared_experts=2", "model.moe.shared_mix=gate", "model.tie_embeddings=true"],
    ["model.moe.router.kind=hash", "model.n_kv_heads=2", "model.activation=gelu"],
    ["model.moe.router.kind=topp", "model.moe.layers=[1]"],
    ["model.ffn_hidden=0", "model.moe.layers=[1]", "model.moe.shared_experts=2", "model.moe.shared_reduce=mean"],
    ["model.moe.router.kind=expert_choice", "model.moe.shared_experts=1", "model.moe.shared_hidden=48"],
])
def test_count_equals_instantiated_model(cli, tiny_recipe, overrides):
    report = _report(cli, tiny_recipe, *overrides)
    model = build_model(load_recipe(tiny_recipe, overrides))
    assert report["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())


def test_active_params_formula(cli, tiny_recipe):
    """Active = total minus the routed experts a token does not use, by hand."""
    report = _report(cli, tiny_recipe)
    d, f, E, k, layers = 32, 32, 4, 2, 2
    expert_params = 3 * d * f
    assert report["params"]["active"] == report["params"]["total"] - layers * (E - k) * expert_params


def test_flops_per_token_convention(cli, tiny_recipe):
    """The FLOPs formula of docs/ (baselines spec) evaluated by hand for the tiny recipe."""
    report = _report(cli, tiny_recipe)
    d, L, nh, dh, S, V, E, k, F = 32, 2, 4, 8, 16, 64, 4, 2, 32
    attn = 2 * d * dh * (nh + 2 * nh) + 2 * nh * dh * d + 2 * S * nh * dh
    moe = 2 * d * E + k * 3 * 2 * d * F
    fwd = L * (attn + moe) + 2 * d * V
    assert report["flops_per_token"]["forward"] == fwd
    assert report["flops_per_token"]["train"] == 3 * fwd


def test_memory_plan(cli, tiny_recipe):
    report = _report(cli, tiny_recipe)
    n = report["params"]["total"]
    assert report["memory_bytes"] == {"weights": 4 * n, "grads": 4 * n, "optimizer": 8 * n, "total": 16 * n}


def test_huge_recipe_builds_without_allocating(cli, tiny_recipe):
    """A ~40B-parameter recipe builds in this process; nothing of that size is allocated."""
    report = _report(cli, "baselines/smoe-share-base", "model.n_layers=48", "model.d_model=4096",
                     "model.n_heads=32", "model.moe.expert_hidden=14336", "model.ffn_hidden=14336")
    assert report["params"]["total"] > 30e9


def test_build_table_output(cli):
    result = cli("build", "quickstart")
    assert result.exit_code == 0
    for word in ("experts", "active", "FLOPs/token", "training memory"):
        assert word in result.output


def test_save_writes_loadable_checkpoint(cli, tiny_recipe, tmp_path):
    out = tmp_path / "init"
    result = cli("build", tiny_recipe, "--save", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
    state = load_file(out / "model.safetensors")
    saved_recipe = load_recipe(out)      # a folder with config.yaml is a recipe reference
    model = build_model(saved_recipe)    # same seed -> same initial weights
    expected = model.state_dict()
    if saved_recipe.model.tie_embeddings:
        expected.pop("head.weight")      # a tied alias is stored once, as embed.weight
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor)
    assert not list(tmp_path.glob(".init.tmp*"))


@pytest.mark.parametrize("degree", [2, 4, 8])
def test_per_process_memory_with_the_experts_split(cli, degree):
    """--expert-parallel N: each process holds exactly 1/N of every expert bank and all the rest."""
    from moectl.core.experts import ExpertBank
    from moectl.factory import build_model
    from moectl.recipe.load import load_recipe

    r = cli("build", "bench/finegrained-1b", "--json", "--expert-parallel", str(degree))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    model = build_model(load_recipe("bench/finegrained-1b"), device="meta")
    experts = sum(p.numel() for m in model.modules() if isinstance(m, ExpertBank) for p in m.parameters())
    assert experts % degree == 0
    per_rank = doc["params"]["total"] - experts + experts // degree
    assert doc["expert_parallel"] == {"degree": degree, "memory_bytes_per_rank": {
        "weights": 4 * per_rank, "grads": 4 * per_rank, "optimizer": 8 * per_rank, "total": 16 * per_rank}}
    assert f"experts split {degree} ways" in cli("build", "bench/finegrained-1b", "--expert-parallel",
                                                  str(degree)).output


@pytest.mark.parametrize(("args", "words"), [(["--expert-parallel", "3"], "cannot be split 3 ways"),
                                             (["model.moe=null", "--expert-parallel", "2"], "no routed experts"),
                                             (["--expert-parallel", "0"], "--expert-parallel")])
def test_expert_parallel_degree_refusals(cli, args, words):
    r = cli("build", "quickstart", *args)
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output
