"""Upcycling: at initialisation (no noise, renormalised top-k) the MoE computes the dense model;
training continues from the written folder."""

from __future__ import annotations

import pytest
import torch

from tests.convert.conftest import hf_model, rel_diff, save_hf


@pytest.mark.parametrize("experts,top_k,granularity,layers", [(4, 2, 1, "all"), (8, 4, 2, "all"),
                                                              (8, 4, 4, "every_other"), (4, 1, 1, "1")])
def test_upcycled_model_equals_dense_at_init(dense_run, tmp_path, experts, top_k, granularity, layers):
    from moectl.convert.upcycle import upcycle
    from moectl.runs import load_run

    r = upcycle(dense_run, tmp_path / "moe", experts=experts, top_k=top_k, granularity=granularity, layers=layers)
    dense, moe = load_run(dense_run), load_run(tmp_path / "moe")
    assert moe.model.args.moe.num_experts == experts and moe.model.args.moe.top_k == top_k
    assert [layer.name for layer in moe.model.routed_layers()] == [f"L{i}" for i in r.moe_layers]
    ids = torch.tensor([dense.tokenizer.encode("import os\nprint(os.getcwd())\n" * 3)[:32]])
    with torch.no_grad():
        want, got = dense.model(ids).logits, moe.model(ids).logits
    assert rel_diff(want, got) <= 1e-5
    # the routers really do route: different tokens pick different experts
    loads = moe.model(ids).records[0].load_E
    assert int((loads > 0).sum()) > top_k


def test_noise_breaks_the_copies(dense_run, tmp_path):
    from moectl.convert.upcycle import upcycle
    from moectl.runs import load_run

    upcycle(dense_run, tmp_path / "moe", experts=4, top_k=2, noise=0.1, seed=1)
    w1 = load_run(tmp_path / "moe").model.layers[0].mlp.moe.experts.w1
    assert not torch.equal(w1[0], w1[1])


def test_one_training_step_from_an_upcycled_folder(dense_run, tmp_path, cli):
    out = tmp_path / "moe"
    r = cli("convert", dense_run, out, "--upcycle", "--experts", "4", "--top-k", "2")
    assert r.exit_code == 0, r.output
    r = cli("train", out, "train.max_steps=1", "train.eval_batches=1", "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "checkpoints" / "step-00000001").is_dir()
    r = cli("generate", out, "--prompt", "def ", "-n", "3")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("family,kw", [("llama", {}), ("qwen3", dict(head_dim=12)), ("qwen2", {}),
                                       ("mistral", dict(sliding_window=8)),
                                       ("qwen3", dict(head_dim=12, rope_parameters={
                                           "rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                           "original_max_position_embeddings": 16}))],
                         ids=["llama", "qwen3", "qwen2", "mistral-window", "qwen3-yarn"])
def test_upcycle_a_dense_hf_folder(tmp_path, tokens, family, kw):
    """Every dense source upcycles to an MoE that computes exactly what the dense model computes
    (Qwen2's q/k/v biases, a binding Mistral window and YaRN carried over)."""
    from moectl.convert.upcycle import upcycle
    from moectl.runs import load_run

    model = hf_model(family, **kw)
    upcycle(save_hf(model, tmp_path / "hf"), tmp_path / "moe", experts=4, top_k=2)
    with torch.no_grad():
        assert rel_diff(model(tokens).logits, load_run(tmp_path / "moe").model(tokens).logits) <= 1e-4


def test_upcycle_refusals(dense_run, trained_run, tmp_path, cli):
    cases = [
        ((trained_run, "--experts", "4", "--top-k", "2"), "already an MoE model"),
        ((dense_run, "--experts", "4", "--top-k", "3", "--granularity", "2"), "multiples of --granularity"),
        ((dense_run, "--experts", "4", "--top-k", "2", "--granularity", "5"), "must divide the FFN width"),
        ((dense_run, "--experts", "4", "--top-k", "9"), "--top-k must lie in 1..4"),
        ((dense_run, "--experts", "4", "--top-k", "2", "--layers", "7"), "layer indices must lie in"),
        ((dense_run, "--experts", "4"), "needs --experts E and --top-k K"),
    ]
    for i, (args, message) in enumerate(cases):
        r = cli("convert", args[0], tmp_path / f"out{i}", "--upcycle", *args[1:])
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output, (args, r.output)
        assert "Traceback" not in r.output and not (tmp_path / f"out{i}").exists()
