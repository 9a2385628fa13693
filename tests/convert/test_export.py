"""moectl -> Hugging Face with generated modeling code: the three methods and every router no
transformers class has, loaded with trust_remote_code=True in a fresh process (no moectl import),
match moectl's logits and generate()."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.convert.conftest import rel_diff

BASE = dict(vocab_size=96, d_model=32, n_layers=3, n_heads=4, ffn_hidden=48, seq_len=32)
MOE = dict(num_experts=4, top_k=2, expert_hidden=16)
MODELS = {
    "cartesian": dict(moe=dict(MOE, block="cartesian", expert_hidden=8)),
    "rmoe": dict(moe=dict(MOE, router=dict(kind="recurrent", hidden=16, logit_residual=0.5))),
    "rmoe-lstm-shared-proj": dict(moe=dict(MOE, router=dict(kind="recurrent", hidden=8, cell="lstm",
                                                            shared_projector=True, projector_bias=True))),
    "competesmoe": dict(moe=dict(MOE, competition=dict(rate=0.5))),
    "topp": dict(moe=dict(MOE, router=dict(kind="topp", p=0.5))),
    "hash": dict(moe=dict(MOE, router=dict(kind="hash", seed=3))),
    "expert_choice": dict(moe=dict(MOE, router=dict(kind="expert_choice"))),
    "sigmoid-bias-shared-gate": dict(moe=dict(MOE, router=dict(kind="topk", score_func="sigmoid",
                                                               bias_update_rate=0.01),
                                              shared_experts=1, shared_mix="gate", layers=[0, 2])),
    "kitchen-sink": dict(n_kv_heads=2, head_dim=12, attention_bias="qkv", qk_norm="head", qkv_clip=0.4,
                         tie_embeddings=True, moe=dict(MOE, shared_experts=2, shared_hidden=8, shared_mix="add",
                                                       router=dict(kind="topk", renormalize=False))),
    "attention-only-dense-mean-shared": dict(ffn_hidden=0, moe=dict(MOE, shared_experts=2, shared_reduce="mean",
                                                                     shared_mix="gate", layers=[0, 2])),
    "gelu-dense": dict(activation="gelu", qk_norm="projection", attention_bias="all",
                       rope_scaling=dict(kind="llama3", factor=8.0, original_context=16)),
}


# The three methods' shipped tiny recipes, as a user trains them.
SHIPPED = ["papers/cartesianmoe/cartesian-base-tiny", "papers/rmoe/rmoe-enwik8-tiny",
           "papers/competesmoe/competesmoe-154m-tiny"]


def model_folder(root: Path, name: str, spec: dict | None = None) -> Path:
    """A moectl model folder (config.yaml + model.safetensors) with every tensor perturbed; `spec`
    None builds the shipped recipe `name`."""
    from safetensors.torch import save_file

    from moectl.checkpoint import tied_aliases
    from moectl.factory import build_model
    from moectl.recipe.load import dump_recipe, load_recipe, validate

    recipe = load_recipe(name) if spec is None else validate({"name": name, "model": {**BASE, **spec}}, {}, name)
    name = name.replace("/", "-")
    model = build_model(recipe)
    g = torch.Generator().manual_seed(len(name))
    aliases = tied_aliases(model)
    state = {}
    for key, t in model.state_dict().items():
        if key in aliases:
            continue
        noise = torch.randn(t.shape, generator=g)
        state[key] = (1 + 0.3 * noise) if key.endswith("norm.weight") or "norm_" in key else t + 0.05 * noise
    folder = root / name
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.yaml").write_text(dump_recipe(recipe))
    return folder


CHECK = r"""
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
assert "moectl" not in sys.modules
results = {}
for folder in sys.argv[1:]:
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    model.eval()
    ref = load_file(folder + "/expected.safetensors")
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
        out = model.generate(ref["tokens"][:1, :5], max_new_tokens=4, do_sample=False)
    diff = float((logits - ref["logits"]).abs().max() / ref["logits"].abs().max())
    results[folder] = {"diff": diff, "generated": out.shape[1] - 5, "moectl_loaded": "moectl" in sys.modules,
                       "class": type(model).__name__,
                       "load_problems": sorted(str(x) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                                               for x in info[k])}
print(json.dumps(results))
"""


@pytest.mark.processes
def test_generated_code_matches_in_a_fresh_process(tmp_path):
    from safetensors.torch import save_file

    from moectl.convert.export import export_hf
    from moectl.runs import load_run

    tokens = torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    folders = []
    for name, spec in [*MODELS.items(), *((n, None) for n in SHIPPED)]:
        src = model_folder(tmp_path / "src", name, spec)
        name = name.replace("/", "-")
        result = export_hf(src, tmp_path / "hf" / name)
        assert result.family is None and result.architecture == "MoectlForCausalLM", name
        config = json.loads((tmp_path / "hf" / name / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moectl.MoectlForCausalLM"
        with torch.no_grad():
            logits = load_run(src).model(tokens).logits
        save_file({"tokens": tokens, "logits": logits}, str(tmp_path / "hf" / name / "expected.safetensors"))
        folders.append(str(tmp_path / "hf" / name))
    import ast

    source = (Path(__file__).parents[2] / "moectl" / "convert" / "remote" / "modeling_moectl.py").read_text()
    imported = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
                for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names}
    assert imported <= {"__future__", "math", "torch", "transformers"}, imported
    proc = subprocess.run([sys.executable, "-c", CHECK, *folders], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for folder, r in results.items():
        assert r["diff"] <= 1e-4, (folder, r)
        assert r["generated"] == 4 and not r["moectl_loaded"] and r["class"] == "MoectlForCausalLM", (folder, r)
        assert not r["load_problems"], (folder, r)


def test_generated_code_can_be_forced_and_reimported(tmp_path):
    """A model a native class fits can still be written with generated code; a moectl-exported
    folder imports back to the same tensors."""
    from moectl.convert.export import export_hf
    from moectl.convert.importer import import_hf
    from moectl.runs import load_run

    src = model_folder(tmp_path, "plain", dict(moe=MOE))
    assert export_hf(src, tmp_path / "native").family == "Mixtral"
    assert export_hf(src, tmp_path / "generated", generated=True).family is None
    import_hf(tmp_path / "generated", tmp_path / "back")
    a, b = load_run(src).model.state_dict(), load_run(tmp_path / "back").model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_trained_run_exports_with_its_tokenizer(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moectl.convert.export import export_hf
    from moectl.runs import load_run

    r = export_hf(trained_run, tmp_path / "hf", dtype="bf16")
    assert r.family == "Mixtral"
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    run = load_run(trained_run)
    text = "def main(argv):\n    return 0\n"
    assert tok(text)["input_ids"] == run.tokenizer.encode(text)
    assert tok.eos_token_id == run.tokenizer.eot_id
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([run.tokenizer.encode(text)])
    with torch.no_grad():
        want = run.model(ids).logits
        got = model(ids).logits
    assert rel_diff(want, got) < 0.05     # bf16 weights
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == run.tokenizer.eot_id


@pytest.mark.parametrize("spec,family", [
    (dict(attention_bias="qkv", moe=dict(MOE, shared_experts=1, shared_hidden=24, shared_mix="sigmoid",
                                         layers=[1, 2], router=dict(renormalize=False))), "Qwen2-MoE"),
    (dict(head_dim=12, qk_norm="head", moe=dict(MOE, layers=[0, 2])), "Qwen3-MoE"),
    (dict(qk_norm="projection", qkv_clip=0.5, attention_bias="all", moe=MOE), "OLMoE"),
    (dict(n_kv_heads=2, tie_embeddings=True), "Llama"),
    (dict(rope_scaling=dict(kind="llama3", factor=4.0, original_context=16)), "Llama"),
])
def test_moectl_models_export_to_native_classes(spec, family, tmp_path):
    from transformers import AutoModelForCausalLM

    from moectl.convert.export import export_hf
    from moectl.runs import load_run

    src = model_folder(tmp_path, "m", spec)
    assert export_hf(src, tmp_path / "hf").family == family
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_diff(load_run(src).model(tokens).logits, model.eval()(tokens).logits) <= 1e-4
