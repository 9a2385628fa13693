"""Every natively converted family, with its optional features on and off: HF -> moectl gives the
same logits, and moectl -> HF gives back the original tensors bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from tests.convert.conftest import VARIANTS, hf_model, rel_diff, save_hf


@pytest.mark.parametrize("family,variant", list(VARIANTS), ids=[f"{f}-{v}" for f, v in VARIANTS])
def test_import_matches_and_round_trip_is_exact(family, variant, tmp_path, tokens):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from moectl.convert.export import export_hf
    from moectl.convert.importer import import_hf
    from moectl.runs import load_run

    model = hf_model(family, **VARIANTS[(family, variant)])
    src = save_hf(model, tmp_path / "hf")
    import_hf(src, tmp_path / "moectl")
    run = load_run(tmp_path / "moectl")
    with torch.no_grad():
        want = model(tokens).logits
        got = run.model(tokens).logits
    assert rel_diff(want, got) <= 1e-4

    result = export_hf(tmp_path / "moectl", tmp_path / "back")
    assert result.family is not None and result.architecture == model.__class__.__name__
    original = load_file(src / "model.safetensors")
    exported = load_file(tmp_path / "back" / "model.safetensors")
    assert set(original) == set(exported)
    for name, t in original.items():
        assert t.dtype == exported[name].dtype and torch.equal(t, exported[name]), name

    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    with torch.no_grad():
        assert rel_diff(want, reloaded.eval()(tokens).logits) <= 1e-4
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert written["model_type"] == family


DENSE_SOURCES = [key for key in VARIANTS
                 if key[0] in ("qwen2", "qwen3", "mistral", "gpt_oss", "dots1", "deepseek_v3", "deepseek_v2")]


@pytest.mark.parametrize("family,variant", DENSE_SOURCES, ids=[f"{f}-{v}" for f, v in DENSE_SOURCES])
def test_sources_compute_and_continue_like_transformers(family, variant, tmp_path, tokens):
    """The dense upcycling sources and the 2025 families (GPT-OSS, dots1), each in three or more
    shapes of published models: fp32 logits within 1e-5 relative of transformers, and greedy
    20-token continuations identical (moectl's KV cache against transformers' generate)."""
    from moectl.convert.importer import import_hf
    from moectl.core.generation import generate_ids
    from moectl.runs import load_run

    model = hf_model(family, **VARIANTS[(family, variant)])
    import_hf(save_hf(model, tmp_path / "hf"), tmp_path / "moectl")
    run = load_run(tmp_path / "moectl")
    with torch.no_grad():
        assert rel_diff(model(tokens).logits, run.model(tokens).logits) <= 1e-5
    for prompt in tokens[:, :8]:
        want = model.generate(prompt[None], max_new_tokens=20, min_new_tokens=20, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, 8:].tolist()
        assert generate_ids(run.model, prompt.tolist(), 20) == want


@pytest.mark.parametrize("family,kw,words", [
    ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, use_sliding_window=True,
                       sliding_window=16, max_window_layers=0), "sliding-window attention (16 < 64 positions)"),
    ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, use_sliding_window=True,
                       sliding_window=16, layer_types=["full_attention", "sliding_attention", "full_attention"]),
     "sliding-window attention (16 < 64 positions)"),
])
def test_a_binding_sliding_window_is_refused(family, kw, words, tmp_path):
    from moectl.convert.importer import import_hf
    from moectl.errors import MoectlError

    src = save_hf(hf_model(family, **kw), tmp_path / "hf")
    with pytest.raises(MoectlError, match=words.replace("(", r"\(").replace(")", r"\)")):
        import_hf(src, tmp_path / "moectl")
    assert not (tmp_path / "moectl").exists()


def test_an_imported_mistral_goes_back_to_mistral_and_a_trained_dense_model_to_llama(tmp_path, dense_run):
    """Mistral and Llama compute the same: an imported Mistral exports as Mistral (its convert.json
    says where it came from), a model moectl trained exports as Llama."""
    from moectl.convert.export import export_hf
    from moectl.convert.importer import import_hf

    import_hf(save_hf(hf_model("mistral", **VARIANTS[("mistral", "7b-v0.3")]), tmp_path / "hf"), tmp_path / "m")
    assert export_hf(tmp_path / "m", tmp_path / "back").architecture == "MistralForCausalLM"
    assert export_hf(dense_run, tmp_path / "dense").architecture == "LlamaForCausalLM"


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_fused_expert_layout_imports(family, tmp_path, tokens):
    """transformers v5 holds experts fused (gate_up_proj [E, 2F, D], down_proj [E, D, F]); a folder
    saved in that layout converts to the same model as the per-expert one."""
    from safetensors.torch import save_file

    from moectl.convert.importer import import_hf
    from moectl.runs import load_run

    model = hf_model(family, **VARIANTS[(family, "base")])
    state = model.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    src = tmp_path / "fused"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(src / "config.json")
    import_hf(src, tmp_path / "moectl")
    with torch.no_grad():
        assert rel_diff(model(tokens).logits, load_run(tmp_path / "moectl").model(tokens).logits) <= 1e-4


def test_sharded_and_bf16_round_trip(tmp_path, tokens):
    """Shards with an index both ways; bf16 weights round-trip exactly and the router stays fp32."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from moectl.convert.export import export_hf
    from moectl.convert.importer import import_hf

    model = hf_model("qwen2_moe", **VARIANTS[("qwen2_moe", "base")])
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    import_hf(tmp_path / "hf", tmp_path / "moectl")
    r = export_hf(tmp_path / "moectl", tmp_path / "bf16", dtype="bf16", max_shard_bytes=20_000)
    assert "model.safetensors.index.json" in r.files and len(r.files) > 4
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    dtypes = {}
    for name, file in index["weight_map"].items():
        with safe_open(tmp_path / "bf16" / file, "pt") as f:
            dtypes[name] = f.get_tensor(name).dtype
    routers = [n for n in dtypes if n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))]
    assert routers and all(dtypes[n] == torch.float32 for n in routers)
    assert all(dtypes[n] == torch.bfloat16 for n in dtypes if n not in routers)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    # bf16 -> moectl -> bf16 is exact too
    import_hf(tmp_path / "bf16", tmp_path / "moectl-bf16")
    export_hf(tmp_path / "moectl-bf16", tmp_path / "bf16-again", dtype="bf16")
    from moectl.convert.hfio import read_weights

    a, b = read_weights(tmp_path / "bf16"), read_weights(tmp_path / "bf16-again")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model,family", [
    (dict(attention_bias="all", moe=dict(num_experts=4, top_k=2, expert_hidden=16)), None),
    (dict(head_dim=12, qk_norm="projection", moe=dict(num_experts=4, top_k=2, expert_hidden=16)), None),
    (dict(moe=dict(num_experts=4, top_k=2, expert_hidden=16, router=dict(renormalize=False))), None),
    (dict(moe=dict(num_experts=4, top_k=2, expert_hidden=16, capacity_factor=1.0)), "Mixtral"),
    (dict(moe=dict(num_experts=4, top_k=2, expert_hidden=16, router=dict(jitter_eps=0.1))), "Mixtral"),
    (dict(activation="gelu"), None),
    (dict(attention_bias="qkv"), "Qwen2"),
    (dict(ffn_hidden=0), None),   # attention-only layers: no family has them
    (dict(qk_norm="head", head_dim=12), "Qwen3"),
    (dict(qk_norm="head", moe=dict(num_experts=4, top_k=2, expert_hidden=16)), "Qwen3-MoE"),
    (dict(ffn_hidden=0, moe=dict(num_experts=4, top_k=2, expert_hidden=16)), "Mixtral"),   # every layer MoE: unused
    (dict(moe=dict(num_experts=4, top_k=2, expert_hidden=16, shared_experts=2, shared_reduce="mean",
                   shared_mix="sigmoid")), None),
    # DeepSeek-V3-style routing: dots1 where the attention is Qwen3's, nothing native otherwise
    (dict(qk_norm="head", moe=dict(num_experts=4, top_k=2, expert_hidden=16, shared_experts=1, shared_hidden=32,
                                   router=dict(score_func="sigmoid", bias_update_rate=0.001))), "dots1"),
    (dict(moe=dict(num_experts=4, top_k=2, expert_hidden=16, shared_experts=1,
                   router=dict(score_func="sigmoid"))), None),
    (dict(qk_norm="head", moe=dict(num_experts=4, top_k=2, expert_hidden=16, shared_experts=1, shared_hidden=24,
                                   router=dict(score_func="sigmoid"))), None),      # shared width not 16k
    (dict(qk_norm="head", moe=dict(num_experts=4, top_k=2, expert_hidden=16, shared_experts=1, layers=[0],
                                   router=dict(score_func="sigmoid"))), None),      # dense after MoE
])
def test_native_family_only_where_exact(model, family):
    from moectl.convert.families import families, native_family
    from moectl.recipe.load import validate

    base = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48)
    m = validate({"model": {**base, **model}}, {}, "t").model
    found, reasons = native_family(m)
    assert (found.name if found else None) == family, reasons
    if family is None:
        assert set(reasons) == {f.name for f in families().values()} >= {"Mixtral", "Qwen2-MoE", "Qwen3-MoE",
                                                                          "OLMoE", "Llama", "Qwen3"}


FAMILY_MODULE = '''
from moectl.convert.families.base import Family


class Toy(Family):
    name = "Toy"
    model_type = "toy"
    architecture = "ToyForCausalLM"
    moe = False
    order = 1

    def config_to_hf(self, m):
        return {"intermediate_size": m.ffn_hidden}
'''


def test_the_registry_is_the_modules_of_the_package():
    """Every module of moectl/convert/families (but base) is one family, found without a list."""
    from pathlib import Path

    from moectl.convert import families as package
    from moectl.convert.families import families

    modules = {p.stem for p in Path(package.__file__).parent.glob("*.py")} - {"__init__", "base"}
    found = {type(f).__module__.rsplit(".", 1)[1]: f for f in families().values()}
    assert set(found) == modules and len(families()) == len(modules)
    assert all(f.model_type == module for module, f in found.items())
    assert list(families())[:9] == ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "olmoe", "deepseek_v2",
                                    "deepseek_v3", "dots1", "llama"]


def test_a_new_family_module_is_picked_up(tmp_path, monkeypatch):
    """A module dropped into a families package registers its family; shared and private modules
    are not families; a module with two families is an error."""
    from moectl.convert.families import discover
    from moectl.recipe.load import validate

    pkg = tmp_path / "newfamilies"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "base.py").write_text("")
    (pkg / "_helpers.py").write_text("")
    (pkg / "toy.py").write_text(FAMILY_MODULE)
    monkeypatch.syspath_prepend(tmp_path)
    found = discover([str(pkg)], "newfamilies")
    assert [type(f).__name__ for f in found] == ["Toy"]
    m = validate({"model": dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48)}, {}, "t").model
    toy = found[0]
    assert toy.misfits(m) == []
    assert toy.hf_config(m)["architectures"] == ["ToyForCausalLM"] and toy.hf_config(m)["intermediate_size"] == 48
    (pkg / "twins.py").write_text(FAMILY_MODULE + FAMILY_MODULE.replace("Toy", "Twin").replace('"toy"', '"twin"'))
    with pytest.raises(TypeError, match="exactly one Family subclass, found 2"):
        discover([str(pkg)], "newfamilies")


@pytest.mark.parametrize("params", [
    {"factor": 4.0, "original_max_position_embeddings": 16},
    {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0,
     "beta_fast": 32, "beta_slow": 1},                                       # DeepSeek-V3's
    {"factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
     "truncate": False},                                                     # GPT-OSS's
    {"factor": 8.0, "original_max_position_embeddings": 32, "attention_factor": 1.3},
])
def test_yarn_frequencies_and_temperature_are_transformers(params):
    """moectl's YaRN (frequencies and attention factor) against transformers' own computation."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moectl.convert.families.base import ConfigReader, rope_scaling
    from moectl.core.layers import rope_attention_factor, rope_frequencies

    rope = {"rope_type": "yarn", "rope_theta": 1e4, **params}
    cfg = AutoConfig.for_model("llama", hidden_size=64, num_attention_heads=2, max_position_embeddings=8192,
                               rope_parameters=rope)
    want_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    ours = rope_scaling(rope, ConfigReader({"max_position_embeddings": 8192}, "t"))
    got = rope_frequencies(32, 1e4, ours)
    torch.testing.assert_close(got, want_freq.float(), rtol=1e-6, atol=0)
    assert abs(rope_attention_factor(ours) - want_factor) < 1e-12
    assert not torch.allclose(got, rope_frequencies(32, 1e4, None))   # it does stretch something



def _mxfp4_encode(w):
    """MXFP4 blocks and scales of a tensor [..., G * 32] whose values are FP4 values times a power
    of two per group of 32 (so that the encoding is exact)."""
    from moectl.convert.families.gpt_oss import FP4_VALUES

    groups = w.unflatten(-1, (-1, 32))
    exponent = torch.floor(torch.log2(groups.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-20, 20)
    scaled = groups / torch.ldexp(torch.ones(()), exponent.long()).unsqueeze(-1)
    table = torch.tensor(FP4_VALUES[:8])
    codes = (scaled.abs().unsqueeze(-1) - table).abs().argmin(-1) + 8 * (scaled < 0)
    codes = codes.to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent + 127).to(torch.uint8)


def test_gpt_oss_mxfp4_experts_are_dequantised(tmp_path, tokens):
    """The published GPT-OSS checkpoints keep expert matrices as MXFP4 blocks and scales: a folder
    in that form imports to the model whose experts hold the dequantised values (logits equal to
    transformers on those values), in bf16."""
    from safetensors.torch import load_file, save_file

    from moectl.convert.families.gpt_oss import dequantize_mxfp4
    from moectl.convert.importer import import_hf
    from moectl.runs import load_run

    model = hf_model("gpt_oss", **{**VARIANTS[("gpt_oss", "gpt-oss-20b")], "intermediate_size": 32})
    src = save_hf(model, tmp_path / "hf")
    state = load_file(src / "model.safetensors")
    for name in [k for k in state if k.endswith(("gate_up_proj", "down_proj"))]:
        w = state.pop(name).float().transpose(1, 2).contiguous()          # [E, out, in]
        blocks, scales = _mxfp4_encode(w)
        state[name + "_blocks"], state[name + "_scales"] = blocks, scales
        exact = dequantize_mxfp4(blocks, scales, torch.float32).transpose(1, 2)
        with torch.no_grad():
            dict(model.named_parameters())[name].copy_(exact)               # what the checkpoint now holds
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    import_hf(src, tmp_path / "moectl")
    run = load_run(tmp_path / "moectl")
    assert run.model.layers[0].mlp.moe.experts.w1.dtype == torch.float32      # loaded for compute
    with torch.no_grad():
        assert rel_diff(model(tokens).logits, run.model(tokens).logits) <= 1e-5
    from moectl.convert.hfio import LazyWeights

    assert LazyWeights(tmp_path / "moectl").spec("layers.0.mlp.moe.experts.w1").dtype == torch.bfloat16


def test_mxfp4_dequantisation_by_hand():
    from moectl.convert.families.gpt_oss import dequantize_mxfp4

    blocks = torch.tensor([[0x21] + [0] * 15], dtype=torch.uint8)    # first byte: 0.5 (low nibble), 1.0 (high)
    scales = torch.tensor([128], dtype=torch.uint8)                  # 2^1
    out = dequantize_mxfp4(blocks, scales, torch.float32)
    assert out.shape == (32,) and out[:2].tolist() == [1.0, 2.0] and not out[2:].any()
    blocks = torch.tensor([[0xF9] + [0] * 15], dtype=torch.uint8)    # -0.5 (9), -6 (15)
    assert dequantize_mxfp4(blocks, torch.tensor([126], dtype=torch.uint8), torch.float32)[:2].tolist() == [-0.25, -3.0]


def _fp8_blocks(w, block=4):
    """Block-scaled FP8 of `w` (e4m3 values, an inverse scale per block) and the exact values it holds."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    scale = torch.zeros(rows, cols)
    for r in range(rows):
        for c in range(cols):
            part = w[r * block:(r + 1) * block, c * block:(c + 1) * block]
            scale[r, c] = part.abs().max().clamp_min(1e-12) / 448.0
    full = scale.repeat_interleave(block, 0)[: w.shape[0]].repeat_interleave(block, 1)[:, : w.shape[1]]
    q = (w / full).to(torch.float8_e4m3fn)
    return q, scale, (q.float() * full).to(torch.bfloat16).float()


def test_deepseek_fp8_weights_are_dequantised(tmp_path, tokens):
    """DeepSeek-V3's published checkpoints hold block-scaled FP8 matrices with weight_scale_inv
    beside them: they import dequantised (bf16), computing what transformers computes on those
    values; FP8 without scales and other quantisations are refused by name."""
    import json

    from safetensors.torch import load_file, save_file

    from moectl.convert.importer import import_hf
    from moectl.errors import MoectlError
    from moectl.runs import load_run

    model = hf_model("deepseek_v3", **VARIANTS[("deepseek_v3", "v3")])
    src = save_hf(model, tmp_path / "hf")
    state = load_file(src / "model.safetensors")
    params = dict(model.named_parameters())
    for name in [k for k in state if k.endswith("proj.weight") and state[k].dim() == 2 and ".experts." not in k]:
        q, scale, exact = _fp8_blocks(state[name].float())
        state[name], state[name + "_scale_inv"] = q, scale
        with torch.no_grad():
            params[name].copy_(exact)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [4, 4], "fmt": "e4m3"}
    (src / "config.json").write_text(json.dumps(config))
    import_hf(src, tmp_path / "moectl")
    with torch.no_grad():
        assert rel_diff(model(tokens).logits, load_run(tmp_path / "moectl").model(tokens).logits) <= 1e-5
    # without quantization_config the float8 tensors are refused; another method is named
    del config["quantization_config"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoectlError, match="float8 without the scales"):
        import_hf(src, tmp_path / "again")
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoectlError, match="quantised with 'gptq'"):
        import_hf(src, tmp_path / "again")
    assert not (tmp_path / "again").exists()
