"""The paper recipes as their authors ran them: what each recipe sets, the parameter counts its
build gives, the statistics of its initialisation, and CompeteSMoE at rate 0 being its baseline
bit for bit."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from safetensors.torch import load_file

from moectl.core import RoutingMode
from moectl.factory import build_model
from moectl.recipe.load import load_recipe
from tests.conftest import REPO
from tests.train.helpers import losses

PAPERS = REPO / "recipes" / "papers"


def _recipe(name, *overrides):
    return load_recipe(PAPERS / f"{name}.yaml", list(overrides))


def _params(cli, name, *overrides):
    result = cli("build", f"papers/{name}", *overrides, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["params"]


def _first_router_logits(name, *overrides, tokens=512):
    """The first routed layer's router logits at initialisation, for random tokens."""
    rec = _recipe(name, *overrides)
    torch.manual_seed(rec.seed)
    model = build_model(rec).eval()
    seen = []
    ids = torch.randint(0, rec.model.vocab_size, (4, tokens // 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids, mode=RoutingMode(observer=lambda obs: seen.append(obs)))
    return seen[0].logits_TE, seen[0].expert_ids_TK, rec.model.moe.num_experts


# ----------------------------------------------------------------------------- RMoE


ENWIK8_FAMILY = sorted(p for p in (PAPERS / "rmoe").glob("*.yaml") if "0.9b" not in p.name)


@pytest.mark.parametrize("path", ENWIK8_FAMILY, ids=lambda p: p.stem)
def test_rmoe_enwik8_and_wt103_routers_start_from_pytorch_defaults(path):
    assert load_recipe(path).model.moe.router_init == "torch_default"


@pytest.mark.parametrize("name", ["rmoe/rmoe-0.9b", "rmoe/smoe-0.9b"])
def test_rmoe_megatron_runs_keep_the_scaled_normal_router(name):
    m = _recipe(name).model
    assert m.moe.router_init is None and m.init == "scaled_normal" and m.init_std == 0.02


def test_rmoe_router_logits_at_init():
    """The recurrent router with PyTorch's defaults: logits about 0.12 std at tiny width (0.0034
    with N(0, 0.02)), the linear router's U(+-1/sqrt(d)) about 0.58."""
    rmoe = _first_router_logits("rmoe/rmoe-enwik8-tiny")[0].std(-1).mean().item()
    old = _first_router_logits("rmoe/rmoe-enwik8-tiny", "model.moe.router_init=scaled_normal")[0].std(-1).mean().item()
    smoe = _first_router_logits("rmoe/smoe-enwik8-tiny")[0].std(-1).mean().item()
    assert 0.05 < rmoe < 0.15 and old < 0.01 and 0.4 < smoe < 0.8


@pytest.mark.parametrize("path", ENWIK8_FAMILY, ids=lambda p: p.stem)
def test_rmoe_enwik8_and_wt103_routers_have_the_checkpoints_output_bias(path):
    m = load_recipe(path).model.moe
    assert m.router.kind != "recurrent" or (m.router.output_bias and m.router.projector_bias)
    assert m.balance_over_layers == "sum" and m.balance_form == "switch"


@pytest.mark.parametrize("name", ["rmoe/rmoe-0.9b", "rmoe/smoe-0.9b", "rmoe/rmoe-0.9b-tiny", "rmoe/smoe-0.9b-tiny"])
def test_rmoe_megatron_runs_average_the_balance_loss_over_layers(name):
    m = _recipe(name).model.moe
    assert (m.balance_over_layers, m.balance_form, m.balance_pooling, m.z_loss_weight) == ("mean", "switch",
                                                                                           "batch", 0.0)
    assert not getattr(m.router, "output_bias", False)


@pytest.mark.parametrize("name, expected", [
    ("rmoe/rmoe-0.9b", ["balance loss 0.01 x Switch over all slots, over the batch, averaged over the routed layers",
                        "no z-loss", "bias on neither the projector nor the output layer"]),
    ("rmoe/rmoe-enwik8", ["summed over layers", "bias on projector and output"]),
    ("competesmoe/smoe-154m", ["balance loss 0.01 x entropy form, per sequence, summed over layers; no z-loss"]),
    ("competesmoe/competesmoe-154m", ["balance 0.005 x entropy form, per sequence on softmax(softmax(responses))"]),
])
def test_build_names_the_regularisers(cli, name, expected):
    result = cli("build", f"papers/{name}")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for words in expected:
        assert words in text, words


# ----------------------------------------------------------------------------- CompeteSMoE 2025


@pytest.mark.parametrize("name", ["competesmoe/smoe-154m", "competesmoe/competesmoe-154m",
                                  "competesmoe/smoe-154m-tiny", "competesmoe/competesmoe-154m-tiny"])
def test_competesmoe_154m_uses_the_language_model_codes_regularisers(name):
    m = _recipe(name).model.moe
    assert (m.balance_form, m.balance_pooling, m.balance_over_layers, m.aux_loss_weight, m.z_loss_weight) == (
        "entropy", "sequence", "sum", 0.01, 0.0)
    if m.competition is not None:
        c = m.competition
        assert (c.balance_weight, c.balance_form, c.balance_pooling, c.balance_scores) == (
            0.005, "entropy", "sequence", "double_softmax")
        assert (c.router_loss_weight, c.diversity_weight, c.theta) == (0.001, 0.005, 0.2)


@pytest.mark.parametrize("name", ["competesmoe/smoe-154m", "competesmoe/competesmoe-154m"])
def test_competesmoe_154m_is_the_authors_model(cli, name):
    """ReLU two-matrix experts and 4 heads make the 154M model: 151.5M parameters besides the
    embedding and the LM head (the SwiGLU version had 251M in all)."""
    m = _recipe(name).model
    assert m.activation == "relu" and m.n_heads == 4 and m.moe.init == "sigma_moe"
    p = _params(cli, name)
    body = p["total"] - p["components"]["embedding"]["total"] - p["components"]["lm_head"]["total"]
    assert abs(body / 154e6 - 1) < 0.02, body
    text = cli("build", f"papers/{name}")
    assert text.exit_code == 0 and f"({body / 1e6:.1f}M without the LM head)" in text.stdout, text.stdout
    if "competesmoe" in name.split("/")[1]:
        c = m.moe.competition
        assert (c.warmup, c.rate, c.max_layers, c.response, c.gate, c.target) == (
            0.0, 0.07, 3, "mean_softplus", "linear", "all")


def test_competesmoe_154m_init_statistics():
    """sigma_moe at the paper's width: router logits of std about 1 and expert outputs of rms about
    0.09 for unit-rms inputs (the 0.02-std init gave 20-60x smaller outputs)."""
    rec = _recipe("competesmoe/smoe-154m", "model.n_layers=1", "model.vocab_size=512")
    torch.manual_seed(0)
    layer = build_model(rec).routed_layers()[0]
    x = torch.randn(2048, rec.model.d_model)
    with torch.no_grad():
        logits = x @ layer.router.weight.t()
        out = layer.experts.forward_all(x)            # [E, T, D]
    assert 0.9 < logits.std().item() < 1.1
    assert 0.07 < out.pow(2).mean().sqrt().item() < 0.11


@pytest.mark.train
def test_competesmoe_at_rate_zero_is_its_baseline_bit_for_bit(cli, tmp_path):
    """With rate 0 the competition layer never competes: training losses, validation losses and the
    final weights equal the top-K SMoE baseline's exactly."""
    common = ["train.max_steps=4", "train.warmup_steps=1", "train.eval_every=2", "train.eval_batches=1",
              "train.batch_size=2", "train.log_every=1", "data.max_documents=200", "data.val_fraction=0.05", "-q"]
    a = cli("train", "papers/competesmoe/smoe-154m-tiny", *common, "--run-dir", tmp_path / "smoe")
    b = cli("train", "papers/competesmoe/competesmoe-154m-tiny", "model.moe.competition.rate=0", *common,
            "--run-dir", tmp_path / "rate0")
    c = cli("train", "papers/competesmoe/competesmoe-154m-tiny", *common, "--run-dir", tmp_path / "compete")
    assert a.exit_code == b.exit_code == c.exit_code == 0, a.output + b.output + c.output
    assert losses(tmp_path / "smoe") == losses(tmp_path / "rate0")
    assert losses(tmp_path / "compete") != losses(tmp_path / "smoe")   # it does compete at 0.07 from step 0

    def weights(run):
        return load_file(str(next((run / "checkpoints").glob("step-*")) / "model.safetensors"))

    wa, wb = weights(tmp_path / "smoe"), weights(tmp_path / "rate0")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    val = lambda run: [r["val_loss"] for r in map(json.loads, (run / "logs" / "metrics.jsonl").read_text().splitlines())
                       if r["type"] == "eval"]
    assert val(tmp_path / "smoe") == val(tmp_path / "rate0") and val(tmp_path / "smoe")


@pytest.mark.train
def test_competition_agreement_is_logged(cli, tmp_path):
    result = cli("train", "papers/competesmoe/competesmoe-enwik8-s-tiny", "train.max_steps=3", "train.warmup_steps=0",
                 "train.log_every=1", "train.eval_batches=1", "train.batch_size=2", "data.max_documents=200",
                 "data.val_fraction=0.05", "--run-dir", tmp_path / "run", "-q")
    assert result.exit_code == 0, result.output
    steps = [r for r in map(json.loads, (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "train"]
    assert len(steps) == 3
    for r in steps:   # rate 1.0: every layer competes in every step
        assert r["competitions"] == 3 and 0 <= r["compete_agree_top1"] <= r["compete_agree_overlap"] * 2 <= 2
        assert 0 <= r["compete_agree_overlap"] <= 1 and "compete_tokens" not in r


# ----------------------------------------------------------------------------- CompeteSMoE 2024


@pytest.mark.parametrize("size, rate, combine", [("s", 1.0, False), ("m", 0.03, False), ("l", 1.0, True)])
def test_competesmoe_2024_recipes_follow_the_scripts(size, rate, combine):
    m = _recipe(f"competesmoe/competesmoe-enwik8-{size}").model
    c = m.moe.competition
    assert (c.rate, c.combine_gate, c.schedule, c.response, c.gate, c.target) == (
        rate, combine, "bernoulli", "l2_norm", "softmax", "winners")
    assert (c.warmup, c.theta, c.router_loss_weight, c.diversity_weight, c.balance_weight) == (0.0, 0.0, 0.05, 0.0, 0.0)
    base = _recipe(f"competesmoe/smoe-enwik8-{size}")
    assert base.model.moe.layer_indices(base.model.n_layers) == m.moe.layer_indices(m.n_layers)
    assert base.train.warmup_steps == {"s": 3000, "m": 4000, "l": 6000}[size]
    assert base.train.max_steps == {"s": 60000, "m": 80000, "l": 120000}[size]


def test_competesmoe_2024_l_has_9_moe_layers_and_attention_only_between(cli):
    m = _recipe("competesmoe/smoe-enwik8-l").model
    assert m.moe.layer_indices(m.n_layers) == list(range(0, 18, 2)) and m.ffn_hidden == 0
    p = _params(cli, "competesmoe/smoe-enwik8-l")
    assert "dense_ffn" not in p["components"] or p["components"]["dense_ffn"]["total"] == 0
    rec = _recipe("competesmoe/smoe-enwik8-l-tiny")
    model = build_model(rec)
    dense = [b.mlp for i, b in enumerate(model.layers) if i % 2]
    assert dense and all(not list(d.parameters()) for d in dense)


# ----------------------------------------------------------------------------- CartesianMoE baselines


def test_smoe_top3_has_the_papers_258m_active(cli):
    p = _params(cli, "cartesianmoe/smoe-top3-base")
    assert abs(p["active"] / 258e6 - 1) < 0.005 and abs(p["total"] / 842e6 - 1) < 0.005


def test_finegrained_averages_its_two_shared_experts():
    for name in ("cartesianmoe/finegrained-base", "cartesianmoe/finegrained-base-tiny"):
        assert _recipe(name).model.moe.shared_reduce == "mean"
    rec = _recipe("cartesianmoe/finegrained-base-tiny")
    layer = build_model(rec).routed_layers()[0]
    assert layer.shared_scale == 0.5
    x = torch.randn(10, rec.model.d_model)
    routed = torch.randn(10, rec.model.d_model)
    with torch.no_grad():
        c = layer.shared_gate(x).softmax(-1)
        want = c[:, :1] * routed + c[:, 1:] * 0.5 * layer.shared(x)
        torch.testing.assert_close(layer.mix_shared(routed, x), want)


# ----------------------------------------------------------------------------- every paper recipe


def test_every_paper_recipe_names_its_sources():
    """Each full paper recipe's comment says where its values come from (a paper, a code base or the spec)."""
    for path in sorted(PAPERS.rglob("*.yaml")):
        if path.name.endswith("-tiny.yaml"):
            continue
        head = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
        assert any(w in head for w in ("paper", "Paper", "code", "scripts", "spec")), path
        assert statistics.mean(len(line) for line in head.splitlines()) > 20, path


def _without(d, *keys):
    return {k: v for k, v in d.items() if k not in keys}


@pytest.mark.parametrize("method, base", [
    *[(f"competesmoe/competesmoe-{s}-tiny", f"competesmoe/smoe-{s}-tiny") for s in ("154m", "enwik8-s", "enwik8-m",
                                                                                   "enwik8-l")],
    *[(f"competesmoe/competesmoe-{s}", f"competesmoe/smoe-{s}") for s in ("154m", "enwik8-s", "enwik8-m", "enwik8-l")],
    ("rmoe/rmoe-enwik8-tiny", "rmoe/smoe-enwik8-tiny"), ("rmoe/rmoe-wt103-tiny", "rmoe/smoe-wt103-tiny"),
    ("rmoe/rmoe-enwik8", "rmoe/smoe-enwik8"), ("rmoe/rmoe-0.9b", "rmoe/smoe-0.9b"),
])
def test_method_differs_from_its_baseline_only_in_the_method(method, base):
    """A method recipe and its SMoE baseline are the same model, data and training but for the
    method's own keys (competition; the router), so the comparison isolates the method."""
    a, b = _recipe(method).model_dump(), _recipe(base).model_dump()
    assert _without(a, "name", "description", "model") == _without(b, "name", "description", "model")
    ma, mb = a["model"], b["model"]
    assert _without(ma, "moe") == _without(mb, "moe")
    assert _without(ma["moe"], "competition", "router") == _without(mb["moe"], "competition", "router")
