"""`load_run`: a run folder (or one of its checkpoints) back to recipe, model, tokenizer and step,
built on the meta device, with no random generator touched, and a clear error for every bad input."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moectl.errors import MoectlError
from moectl.factory import build_model
from moectl.recipe.load import load_recipe
from moectl.runs import find_checkpoint, load_run
from moectl.train.trainer import train
from tests.conftest import train_recipe_text, trains

# Tied embeddings (an alias stored once) and aux-loss-free biases (a persistent buffer) on purpose.
OVERRIDES = ["model.tie_embeddings=true", "model.moe.router.bias_update_rate=0.01", "train.eval_every=null"]


@pytest.fixture(scope="module")
@trains
def run(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    path = root / "recipe.yaml"
    path.write_text(train_recipe_text(corpus, max_steps=6, checkpoint_every=3))
    train(load_recipe(path, OVERRIDES), run_dir=root / "run", resume="never", show_progress=False)
    return root / "run"


def test_loads_the_checkpoint_exactly(run):
    loaded = load_run(run)
    assert loaded.step == 6 and loaded.run_dir == run and loaded.checkpoint.name == "step-00000006"
    assert not loaded.model.training
    assert loaded.model.head.weight is loaded.model.embed.weight           # tied again after assign
    saved = load_file(loaded.checkpoint / "model.safetensors")
    state = loaded.model.state_dict()
    assert "layers.0.mlp.moe.router.expert_bias" in saved
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert not any(t.is_meta for t in [*loaded.model.parameters(), *loaded.model.buffers()])
    # The same outputs as a model built and initialised the ordinary way, then loaded.
    plain = build_model(load_recipe(run))
    plain.load_state_dict({**saved, "head.weight": saved["embed.weight"]})
    x = torch.randint(0, 512, (2, 32))
    torch.testing.assert_close(loaded.model(x).logits, plain.eval()(x).logits, rtol=0, atol=0)


def test_touches_no_random_generator_and_initialises_nothing(run, monkeypatch):
    calls = []
    real = torch.nn.init.normal_

    def counting(tensor, *a, **k):
        if not tensor.is_meta:
            calls.append(tensor.shape)
        return real(tensor, *a, **k)

    monkeypatch.setattr(torch.nn.init, "normal_", counting)
    torch.manual_seed(123)
    random.seed(4)
    np.random.seed(5)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    load_run(run)
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and (before[2] == after[2]).all()
    assert calls == []     # nothing drawn for weights that the checkpoint replaces


def test_accepts_a_run_a_checkpoint_latest_and_a_step(run, tmp_path, cli, tiny_recipe):
    assert load_run(run / "checkpoints" / "latest").step == 6
    assert load_run(run / "checkpoints" / "step-00000003").step == 3
    three = load_run(run, step=3)
    assert three.step == 3 and three.checkpoint == run / "checkpoints" / "step-00000003"
    assert not torch.equal(three.model.embed.weight, load_run(run).model.embed.weight)
    # `moectl build --save` folders load too: no step, no tokenizer.
    assert cli("build", tiny_recipe, "--save", tmp_path / "init").exit_code == 0
    init = load_run(tmp_path / "init")
    assert init.step is None and init.tokenizer is None and init.run_dir is None


def test_tokenizer_comes_with_the_run(run):
    tok = load_run(run).tokenizer
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eot_id == json.loads((run / "data.json").read_text())["eot_id"]
    assert tok.vocab_size <= 512


def test_bf16_keeps_routers_in_fp32(run):
    full, half = load_run(run), load_run(run, dtype=torch.bfloat16)
    router = half.model.layers[0].mlp.moe.router
    assert router.weight.dtype == torch.float32 and router.expert_bias.dtype == torch.float32
    assert half.model.layers[0].mlp.moe.experts.w1.dtype == torch.bfloat16
    assert half.model.embed.weight.dtype == torch.bfloat16
    x = torch.randint(0, 512, (2, 32))
    a, b = full.model(x, x), half.model(x, x)
    assert abs(a.loss.item() - b.loss.item()) < 0.05


def _copy(run, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


@pytest.mark.parametrize("damage, message", [
    ("nothing there", "no such run or checkpoint"),
    ("not a run", "is not a run folder or a checkpoint"),
    ("no checkpoints", "holds no checkpoint yet"),
    ("no such step", "has no complete checkpoint of step 4 (it has: 3, 6)"),
    ("truncated weights", "is damaged or not a safetensors file"),
    ("missing tensor", "missing: layers.1.mlp.moe.experts.w2"),
    ("other model", "does not match the recipe's model"),
    ("incomplete checkpoint", "is an incomplete checkpoint"),
    ("latest names nothing", "which is not a complete checkpoint"),
    ("a file", "is a file, not a run folder"),
])
def test_clear_errors(run, tmp_path, damage, message):
    copy = _copy(run, tmp_path)
    step6 = copy / "checkpoints" / "step-00000006"
    target, step = copy, None
    if damage == "nothing there":
        target = tmp_path / "nowhere"
    elif damage == "not a run":
        target = tmp_path / "empty"
        target.mkdir()
    elif damage == "no checkpoints":
        shutil.rmtree(copy / "checkpoints")
    elif damage == "no such step":
        step = 4
    elif damage == "truncated weights":
        data = (step6 / "model.safetensors").read_bytes()
        (step6 / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "missing tensor":
        state = load_file(step6 / "model.safetensors")
        del state["layers.1.mlp.moe.experts.w2"]
        save_file(state, str(step6 / "model.safetensors"))
    elif damage == "other model":
        text = (copy / "config.yaml").read_text()
        (copy / "config.yaml").write_text(text.replace("d_model: 32", "d_model: 64"))
    elif damage == "incomplete checkpoint":
        (step6 / "meta.json").unlink()
        target = step6
    elif damage == "latest names nothing":
        (copy / "checkpoints" / "latest").write_text("step-00000099\n")
    elif damage == "a file":
        target = copy / "config.yaml"
    with pytest.raises(MoectlError) as err:
        load_run(target, step=step)
    assert err.value.exit_code == 2
    assert message in err.value.message, err.value.message


def test_find_checkpoint_without_loading(run):
    assert find_checkpoint(run) == (run / "checkpoints" / "step-00000006", run)
    assert find_checkpoint(run / "checkpoints" / "step-00000003") == (run / "checkpoints" / "step-00000003", run)


def test_same_run_check_ignores_what_is_off_or_spelled_short(tmp_path, tiny_recipe):
    """A run's config.yaml leaves out routed-layer variants that are off (so installing a plugin
    that registers one does not change a run), and resuming compares recipes with sections that
    are off, written as null or not at all, and bare kind names, as the same."""
    import yaml

    from moectl.recipe.load import dump_recipe
    from moectl.rundir import RunDir
    from moectl.train.resume import check_same_run

    recipe = load_recipe(tiny_recipe)
    assert "competition" not in dump_recipe(recipe)
    data = yaml.safe_load(dump_recipe(recipe))
    data["model"]["moe"].update(competition=None, block="standard")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    check_same_run(RunDir(tmp_path), recipe)
    data["model"]["moe"]["top_k"] = 1
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(MoectlError, match="model: differs"):
        check_same_run(RunDir(tmp_path), recipe)
