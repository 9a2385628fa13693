"""moectl -> Hugging Face.

Generated code: the exported folder runs moectl's own engine (moectl/core flattened, plus a thin
wrapper). One model per registered router, block kind and routed-layer variant (read from the
registries), the option-heavy models, the shipped method recipes, a plugin's router and a bf16
export are each loaded with trust_remote_code=True in one fresh process that cannot import moectl,
and match moectl's logits to 1e-5 (relative), in eval mode, and generate().

Native classes: a model a transformers class computes exactly loads in that class and matches."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moectl.core  # noqa: F401  (registers the engine's parts, which the cases below are read from)
from moectl.convert.flatten import WRAPPER, engine_sources, is_engine
from moectl.core import RoutingMode, registry
from tests.convert.conftest import rel_diff
from tests.test_plugins import ROUTERS

BASE = dict(vocab_size=96, d_model=32, n_layers=3, n_heads=4, ffn_hidden=48, seq_len=32)
MOE = dict(num_experts=4, top_k=2, expert_hidden=16)


def part_models() -> dict[str, dict]:
    """One model per registered router, block kind and routed-layer variant of the engine."""
    cases = {}
    for e in registry.routers:
        if is_engine(e.module):
            cases[f"router-{e.name}"] = dict(moe=dict(MOE, router=dict(kind=e.name)))
    for e in registry.blocks:
        if is_engine(e.module):
            cases[f"block-{e.name}"] = dict(moe=dict(MOE, block=dict(kind=e.name)))
    for e in registry.variants:
        if is_engine(e.module):
            cases[f"variant-{e.name}"] = dict(moe=dict(MOE, **{e.name: {}}))
    return cases


# The options with their own code paths.
OPTIONS = {
    "rmoe-logit-residual": dict(moe=dict(MOE, router=dict(kind="recurrent", hidden=16, logit_residual=0.5))),
    "rmoe-lstm-shared-proj": dict(moe=dict(MOE, router=dict(kind="recurrent", hidden=8, cell="lstm",
                                                            shared_projector=True, projector_bias=True))),
    "cartesian-competition-recurrent": dict(moe=dict(MOE, block="cartesian", expert_hidden=8,
                                                     competition=dict(rate=0.5), router=dict(kind="recurrent"))),
    "topp-shared-gate": dict(moe=dict(MOE, router=dict(kind="topp", p=0.5), shared_experts=1, shared_mix="gate")),
    "sigmoid-bias-shared-gate": dict(moe=dict(MOE, router=dict(kind="topk", score_func="sigmoid",
                                                               bias_update_rate=0.01),
                                              shared_experts=1, shared_mix="gate", layers=[0, 2])),
    "shared-sigmoid-mean-relu-capacity": dict(activation="relu", moe=dict(MOE, shared_experts=2, shared_reduce="mean",
                                                                          shared_mix="sigmoid", capacity_factor=1.0)),
    "kitchen-sink": dict(n_kv_heads=2, head_dim=12, attention_bias="qkv", qk_norm="head", qkv_clip=0.4,
                         tie_embeddings=True, rope_scaling=dict(kind="linear", factor=2.0),
                         moe=dict(MOE, shared_experts=2, shared_hidden=8, shared_mix="add",
                                  router=dict(kind="topk", renormalize=False))),
    "attention-only-dense-mean-shared": dict(ffn_hidden=0, moe=dict(MOE, shared_experts=2, shared_reduce="mean",
                                                                     shared_mix="gate", layers=[0, 2])),
    "gelu-dense": dict(activation="gelu", qk_norm="projection", attention_bias="all",
                       rope_scaling=dict(kind="llama3", factor=8.0, original_context=16)),
}
CASES = {**part_models(), **OPTIONS}
# The three methods' shipped tiny recipes, as a user trains them.
SHIPPED = ["papers/cartesianmoe/cartesian-base-tiny", "papers/rmoe/rmoe-enwik8-tiny",
           "papers/competesmoe/competesmoe-154m-tiny"]

PLUGIN = "exportlab.routers"
# The plugin router of tests/test_plugins.py, under names of its own (both may register in one process).
PLUGIN_SOURCE = ROUTERS.replace('"scaled_topk"', '"tempered_topk"').replace("ScaledTopK", "TemperedTopK")
PLUGIN_MODEL = dict(moe=dict(MOE, router=dict(kind="tempered_topk", temperature=0.3)))


def model_folder(root: Path, name: str, spec: dict | None = None, plugins: list[str] | None = None) -> Path:
    """A moectl model folder (config.yaml + model.safetensors) with every tensor perturbed; `spec`
    None builds the shipped recipe `name`."""
    from safetensors.torch import save_file

    from moectl.checkpoint import tied_aliases
    from moectl.factory import build_model
    from moectl.recipe.load import dump_recipe, load_recipe, validate

    extra = {"plugins": plugins} if plugins else {}
    recipe = load_recipe(name) if spec is None else validate({"name": name, **extra, "model": {**BASE, **spec}},
                                                             {}, name)
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


@contextlib.contextmanager
def plugin_on_path(root: Path):
    """The plugin package `exportlab` importable in this process only; its router is forgotten after."""
    pkg = root / "plugins" / "exportlab"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "routers.py").write_text(PLUGIN_SOURCE)
    sys.path.insert(0, str(pkg.parent))
    try:
        yield
    finally:
        sys.path.remove(str(pkg.parent))
        registry.routers.remove("tempered_topk")
        for name in [m for m in sys.modules if m == "exportlab" or m.startswith("exportlab.")]:
            del sys.modules[name]
        importlib.invalidate_caches()


CHECK = r"""
import importlib.abc, json, sys


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("moectl", "exportlab"):
            raise ImportError(f"{name} may not be imported by an exported model")


sys.meta_path.insert(0, Refuse())
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

results = {}
for folder in sys.argv[1:]:
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    ref = load_file(folder + "/expected.safetensors")
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
        loss = model(ref["tokens"], labels=ref["tokens"]).loss   # the next-token loss on the reference logits:
        want = torch.nn.functional.cross_entropy(ref["logits"][:, :-1].float().flatten(0, 1),
                                                 ref["tokens"][:, 1:].flatten())
        try:
            generated = model.generate(ref["tokens"][:1, :5], max_new_tokens=4, do_sample=False).shape[1] - 5
        except ValueError as e:   # a router that is not causal refuses, as moectl generate does
            generated = "refused: " + str(e)[:120]
    diff = float((logits.float() - ref["logits"].float()).abs().max() / ref["logits"].float().abs().max())
    diff = max(diff, float((loss - want).abs() / want))
    routers = {n for n, _ in model.named_parameters() if ".router." in n or "router_shared" in n}
    results[folder] = {"diff": diff, "generated": generated, "class": type(model).__name__,
                       "training": model.training,
                       "router_dtypes": sorted({str(p.dtype) for n, p in model.named_parameters() if n in routers}),
                       "dtypes": sorted({str(p.dtype) for n, p in model.named_parameters() if n not in routers}),
                       "load_problems": sorted(str(x) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                                               for x in info[k])}
imported = sorted(m for m in sys.modules if m.split(".")[0] in ("moectl", "exportlab"))
print(json.dumps({"results": results, "imported": imported}))
"""


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory) -> dict[str, dict]:
    """Export every case with generated code, and load them all in one fresh process."""
    from safetensors.torch import save_file

    from moectl.convert.export import export_hf
    from moectl.runs import load_run

    tmp = tmp_path_factory.mktemp("generated")
    tokens = torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    folders = {}

    def export(name: str, src: Path, dtype: str = "fp32", reference_dtype: torch.dtype | None = None,
               **kw) -> None:
        out = tmp / "hf" / name
        result = export_hf(src, out, generated=True, dtype=dtype, **kw)
        with torch.no_grad():   # what moectl computes in evaluation (dropless routing, as in decoding)
            logits = load_run(src, dtype=reference_dtype).model(tokens, mode=RoutingMode(decoding=True)).logits
        save_file({"tokens": tokens, "logits": logits}, str(out / "expected.safetensors"))
        folders[name] = (str(out), result)

    for name, spec in CASES.items():
        export(name, model_folder(tmp / "src", name, spec))
    for name in SHIPPED:
        export(name.replace("/", "-"), model_folder(tmp / "src", name))
    export("bf16", model_folder(tmp / "src", "bf16", OPTIONS["kitchen-sink"]), "bf16", torch.bfloat16,
           max_shard_bytes=20_000)   # sharded, with an index
    with plugin_on_path(tmp):
        export("plugin-router", model_folder(tmp / "src", "plugin-router", PLUGIN_MODEL, plugins=[PLUGIN]))
    env = {**os.environ, "HF_HOME": str(tmp / "hf-home")}   # transformers' module cache in tmp
    proc = subprocess.run([sys.executable, "-c", CHECK, *(f for f, _ in folders.values())], capture_output=True,
                          text=True, timeout=600, cwd=tmp, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["imported"] == [], report["imported"]   # neither moectl nor the plugin's own package
    return {name: {**report["results"][folder], "export": result, "folder": Path(folder)}
            for name, (folder, result) in folders.items()}


def _generates(name: str) -> bool:
    """Whether a case's model may generate: one whose router is not causal (expert choice) refuses."""
    return "expert_choice" not in json.dumps(CASES.get(name, {}))


@pytest.mark.processes
@pytest.mark.parametrize("name", [*CASES, *(n.replace("/", "-") for n in SHIPPED), "bf16", "plugin-router"])
def test_generated_code_is_the_engine_and_matches_in_a_fresh_process(name, fresh_process):
    r = fresh_process[name]
    assert r["diff"] <= 1e-5, r
    assert r["generated"] == 4 if _generates(name) else "not causal" in r["generated"], r
    assert r["class"] == "MoectlForCausalLM" and not r["training"], r
    assert not r["load_problems"], r
    assert r["export"].family is None and r["export"].architecture == "MoectlForCausalLM"
    assert r["router_dtypes"] in ([], ["torch.float32"]), r   # routers stay fp32, also in a bf16 export
    assert r["dtypes"] == (["torch.bfloat16"] if name == "bf16" else ["torch.float32"]), r
    config = json.loads((r["folder"] / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == f"{WRAPPER}.MoectlForCausalLM"
    engine = {f"{s.flat}.py" for s in engine_sources()}
    written = {p.name for p in r["folder"].glob("*.py")}
    plugin = {"exportlab_routers.py"} if name == "plugin-router" else set()
    assert written == engine | plugin | {f"{WRAPPER}.py"}
    assert (r["folder"] / "model.safetensors.index.json").is_file() == (name == "bf16")


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


def test_a_plugin_model_exports_and_imports_back(tmp_path):
    """The folder holds the plugin module (its moectl imports made relative) and names the plugin,
    so `--from hf` rebuilds the model where the plugin is installed."""
    from moectl.convert.export import export_hf
    from moectl.convert.importer import import_hf
    from moectl.runs import load_run

    with plugin_on_path(tmp_path):
        src = model_folder(tmp_path / "src", "plugin", PLUGIN_MODEL, plugins=[PLUGIN])
        result = export_hf(src, tmp_path / "hf")
        assert result.family is None and "exportlab_routers.py" in result.files
        text = (tmp_path / "hf" / "exportlab_routers.py").read_text()
        assert "from .moectl_core import Router, RouterOutput, option, register_router" in text
        assert "moectl.core" not in text
        assert json.loads((tmp_path / "hf" / "config.json").read_text())["moectl_plugins"] == [PLUGIN]
        import_hf(tmp_path / "hf", tmp_path / "back")
        a, b = load_run(src).model.state_dict(), load_run(tmp_path / "back").model.state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert load_run(tmp_path / "back").recipe.plugins == [PLUGIN]


def test_a_part_without_source_is_refused_by_name(tmp_path, cli):
    """A router whose source the folder cannot hold (defined inside a function, or in a module
    without a file) is refused, naming the router and its module; nothing is written."""
    import types
    from dataclasses import dataclass

    from moectl.convert.export import export_hf
    from moectl.core import register_router
    from moectl.core.routers.topk import TopKOptions, TopKRouter
    from moectl.errors import MoectlError

    @dataclass
    class LocalOptions(TopKOptions):
        pass

    @register_router("local_topk", options=LocalOptions)
    class LocalTopK(TopKRouter):
        pass

    ghost = sys.modules["ghostlab"] = types.ModuleType("ghostlab")   # a module made in memory: no file
    exec("from dataclasses import dataclass\nfrom moectl.core.routers.topk import TopKOptions, TopKRouter\n"
         "@dataclass\nclass GhostOptions(TopKOptions):\n    pass\n"
         "class GhostTopK(TopKRouter):\n    pass\n", ghost.__dict__)
    register_router("ghost_topk", options=ghost.GhostOptions)(ghost.GhostTopK)
    try:
        src = model_folder(tmp_path, "local", dict(moe=dict(MOE, router=dict(kind="local_topk"))))
        with pytest.raises(MoectlError, match=r"the router 'local_topk' \(LocalTopK in tests\.convert\.test_export\) "
                                              "cannot be exported: it is not defined at the top level of its module"):
            export_hf(src, tmp_path / "hf")
        assert not (tmp_path / "hf").exists()
        r = cli("convert", src, "--to", "hf", tmp_path / "hf")
        assert r.exit_code == 2 and "'local_topk'" in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "hf").exists()
        src = model_folder(tmp_path, "ghost", dict(moe=dict(MOE, router=dict(kind="ghost_topk"))))
        with pytest.raises(MoectlError, match=r"the router 'ghost_topk' \(GhostTopK in ghostlab\) cannot be "
                                              "exported: the source of ghostlab cannot be found"):
            export_hf(src, tmp_path / "hf")
    finally:
        registry.routers.remove("local_topk")
        registry.routers.remove("ghost_topk")
        del sys.modules["ghostlab"]


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
    (dict(head_dim=12, qk_norm="head", attention_bias="all", n_kv_heads=2), "Qwen3"),
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




def test_the_quickstart_exports_natively(tmp_path, cli):
    """The README's model loads in transformers without custom code (Qwen3-MoE), logits equal."""
    from transformers import AutoModelForCausalLM

    from moectl.convert.export import export_hf
    from moectl.runs import load_run

    assert cli("build", "quickstart", "--save", tmp_path / "qs").exit_code == 0
    result = export_hf(tmp_path / "qs", tmp_path / "hf")
    assert result.family == "Qwen3-MoE" and not any(f.endswith(".py") for f in result.files)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_diff(load_run(tmp_path / "qs").model(tokens).logits, model(tokens).logits) <= 1e-4


# A bf16 export loaded in bf16: every tensor of a router stays fp32 (as written, bit for bit), also
# through `.to(torch.bfloat16)`, `.half()` and `from_config(..., dtype=torch.bfloat16)`; the model
# computes what moectl's engine computes on the same weights (equal logits), and what moectl's bf16
# evaluation (autocast over the fp32 model) computes within bf16 tolerance.
CHECK_BF16 = CHECK[:CHECK.index("results = {}")] + r"""
from transformers import AutoConfig

BF16 = torch.bfloat16


def rel(a, b, norm):   # relative difference of b to a: max-abs (norm False) or Frobenius (norm True)
    a, b = a.float(), b.float()
    return float((a - b).norm() / a.norm()) if norm else float((a - b).abs().max() / a.abs().max())


def router_dtypes(model, routers):
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return sorted({str(tensors[n].dtype) for n in routers if n in tensors})


results = {}
for folder in sys.argv[1:]:
    ref = load_file(folder + "/expected.safetensors")
    written = load_file(folder + "/model.safetensors")
    routers = set(json.load(open(folder + "/routers.json")))
    tokens = ref["tokens"]
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=BF16,
                                                       output_loading_info=True)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    r = {"routers": len(routers), "missing_routers": sorted(routers - set(tensors)),
         "router_dtypes": router_dtypes(model, routers),
         "routers_as_written": all(torch.equal(tensors[n], written[n]) for n in routers if n in written),
         "dtypes": sorted({str(p.dtype) for n, p in model.named_parameters() if n not in routers}),
         "load_problems": sorted(str(x) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                                 for x in info[k])}
    with torch.no_grad():
        logits = model(tokens).logits
        r["logits_dtype"] = str(logits.dtype)
        r["engine_diff"] = rel(ref["engine"], logits, norm=False)
        r["autocast_diff"] = rel(ref["autocast"], logits, norm=True)
        r["autocast_max_diff"] = rel(ref["autocast"], logits, norm=False)
        try:
            r["generated"] = model.generate(tokens[:1, :5], max_new_tokens=4, do_sample=False).shape[1] - 5
        except ValueError as e:   # a router that is not causal refuses, as moectl generate does
            r["generated"] = "refused: " + str(e)[:120]
        model.float().to(BF16)
        r["cast_router_dtypes"] = router_dtypes(model, routers)
        r["cast_diff"] = rel(logits, model(tokens).logits, norm=False)
        model.half()
        r["half_router_dtypes"] = router_dtypes(model, routers)
        r["half_finite"] = bool(torch.isfinite(model(tokens).logits).all())
        built = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True),
                                                 trust_remote_code=True, dtype=BF16)
        r["built_router_dtypes"] = router_dtypes(built, routers)
        r["built_finite"] = bool(torch.isfinite(built(tokens).logits).all())
    results[folder] = r
imported = sorted(m for m in sys.modules if m.split(".")[0] in ("moectl", "exportlab"))
print(json.dumps({"results": results, "imported": imported}))
"""


@pytest.fixture(scope="module")
def fresh_process_bf16(tmp_path_factory) -> dict[str, dict]:
    """Export every case with `--dtype bf16`, with moectl's bf16 logits beside it, and load them all
    in bf16 in one fresh process."""
    from safetensors.torch import save_file

    from moectl.convert.export import export_hf
    from moectl.core.accounting import component_parameters
    from moectl.runs import load_run

    tmp = tmp_path_factory.mktemp("generated-bf16")
    tokens = torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    decoding = RoutingMode(decoding=True)   # the exported model routes as moectl decodes (dropless)
    folders = {}
    for name, spec in CASES.items():
        src = model_folder(tmp / "src", name, spec)
        out = tmp / "hf" / name
        export_hf(src, out, generated=True, dtype="bf16")
        model = load_run(src).model
        with torch.no_grad():
            engine = load_run(src, dtype=torch.bfloat16).model(tokens, mode=decoding).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):   # what `moectl eval --dtype bfloat16` runs
                autocast = model(tokens, mode=decoding).logits
        save_file({"tokens": tokens, "engine": engine, "autocast": autocast}, str(out / "expected.safetensors"))
        routers = [f"model.{n}" for n, t, component, _ in component_parameters(model, buffers=True)
                   if component == "router" and t.is_floating_point()]
        (out / "routers.json").write_text(json.dumps(routers))
        folders[name] = str(out)
    env = {**os.environ, "HF_HOME": str(tmp / "hf-home")}
    proc = subprocess.run([sys.executable, "-c", CHECK_BF16, *folders.values()], capture_output=True, text=True,
                          timeout=600, cwd=tmp, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["imported"] == [], report["imported"]
    return {name: report["results"][folder] for name, folder in folders.items()}


@pytest.mark.processes
@pytest.mark.parametrize("name", CASES)
def test_a_bf16_export_loaded_in_bf16_keeps_its_routers_fp32(name, fresh_process_bf16):
    r = fresh_process_bf16[name]
    assert not r["missing_routers"] and not r["load_problems"], r
    assert bool(r["routers"]) == ("moe" in CASES[name]), r   # a dense model has no router
    fp32 = ["torch.float32"] if r["routers"] else []
    for stage in ("router_dtypes", "cast_router_dtypes", "half_router_dtypes", "built_router_dtypes"):
        assert r[stage] == fp32, (stage, r)
    assert r["routers_as_written"], r
    assert r["dtypes"] == ["torch.bfloat16"] and r["logits_dtype"] == "torch.bfloat16", r
    assert r["engine_diff"] <= 1e-5, r       # moectl's engine on the same bf16 weights: equal
    assert r["autocast_diff"] < 0.05, r      # moectl's bf16 evaluation: within bf16 tolerance
    assert r["generated"] == 4 if _generates(name) else "not causal" in r["generated"], r
    assert r["cast_diff"] == 0.0 and r["half_finite"] and r["built_finite"], r


DEEPSEEK_STYLE = ["model.qk_norm=head", "model.moe.shared_experts=1", "model.moe.shared_hidden=64",
                  "model.moe.router={kind: topk, score_func: sigmoid, bias_update_rate: 0.01, groups: 2, "
                  "topk_groups: 1, routed_scaling: 2.0}"]


@pytest.mark.train
def test_a_trained_deepseek_style_model_exports_as_dots1(corpus, tmp_path):
    """Sigmoid routing with an aux-loss-free bias, group-limited selection, a routing scale and a
    shared expert, trained by moectl, is written as transformers' native dots1 class: the selection
    bias as it stands after training, logits and greedy continuations as moectl's."""
    from transformers import AutoModelForCausalLM

    from moectl.convert.export import export_hf
    from moectl.core.generation import generate_ids
    from moectl.runs import load_run
    from tests.conftest import train_run

    run_dir = train_run(corpus, tmp_path, "ds", DEEPSEEK_STYLE)
    run = load_run(run_dir)
    assert sum(float(layer.router.expert_bias.abs().sum()) for layer in run.model.routed_layers()) > 0   # it moved
    result = export_hf(run_dir, tmp_path / "hf")
    assert result.architecture == "Dots1ForCausalLM" and not any(f.endswith(".py") for f in result.files)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_diff(run.model(tokens).logits, model(tokens).logits) <= 1e-5
    want = model.generate(tokens[:1, :6], max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, 6:].tolist()
    assert generate_ids(run.model, tokens[0, :6].tolist(), 12) == want


MLA = ["model.latent_attention={q_rank: 16, kv_rank: 12, nope_dim: 8, rope_dim: 4, v_dim: 8}",
       "model.moe.shared_experts=1", "model.moe.first_dense=1", "model.moe.layers=all"]
SIGMOID_GROUPS = "score_func: sigmoid, bias_update_rate: 0.01, groups: 2, topk_groups: 1, routed_scaling: 2.0"


@pytest.mark.train
@pytest.mark.processes
@pytest.mark.parametrize("router,native", [("topk", True), ("recurrent", False)])
def test_a_trained_mla_model_exports(router, native, corpus, tmp_path):
    """Latent attention with group-limited sigmoid routing, an aux-loss-free bias and shared experts
    trains on the CPU; with the topk router it is written as transformers' DeepSeek-V3 class, with
    RMoE's recurrent router as generated code; both compute what moectl computes."""
    import subprocess

    from moectl.convert.export import export_hf
    from moectl.runs import load_run
    from tests.conftest import train_run

    run_dir = train_run(corpus, tmp_path, "mla", [*MLA, f"model.moe.router={{kind: {router}, {SIGMOID_GROUPS}}}"])
    result = export_hf(run_dir, tmp_path / "hf")
    assert (result.architecture == "DeepseekV3ForCausalLM") == native, result
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_run(run_dir).model(tokens).logits
    torch.save(tokens, tmp_path / "tokens.pt")
    code = ("import torch; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}, trust_remote_code=True).eval(); "
            f"t = torch.load({str(tmp_path / 'tokens.pt')!r}); "
            f"torch.save(m(t).logits.detach(), {str(tmp_path / 'got.pt')!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert rel_diff(want, torch.load(tmp_path / "got.pt")) <= 1e-5
