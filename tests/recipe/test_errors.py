"""Broken recipes: every kind of mistake exits with code 2 and a message that names the key path
(and where the value was written), with no traceback."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_RECIPE


def _replace(old: str, new: str) -> str:
    assert old in TINY_RECIPE
    return TINY_RECIPE.replace(old, new)


CASES = {
    # name: (recipe text or None for "no file", overrides, expected substrings)
    "yaml_syntax": (TINY_RECIPE.replace("  d_model: 32\n", "  d_model: [32\n"), [],
                    ["YAML syntax error", "tiny.yaml:"]),
    "yaml_bad_indent": (TINY_RECIPE.replace("  n_layers: 2", "    n_layers: 2"), [],
                        ["YAML syntax error", "tiny.yaml:6:"]),
    "empty_file": ("", [], ["the recipe is empty"]),
    "only_comments": ("# nothing here\n", [], ["the recipe is empty"]),
    "top_level_list": ("- a\n- b\n", [], ["must be a mapping"]),
    "missing_file": (None, [], ["recipe not found"]),
    "unknown_router_kind": (TINY_RECIPE + "    router:\n      kind: banana\n", [],
                            ["model.moe.router.kind", "unknown router kind 'banana'", "topk"]),
    "unknown_key_did_you_mean": (_replace("top_k: 2", "top_kk: 2"), [],
                                 ["model.moe.top_kk", "did you mean model.moe.top_k?"]),
    "key_in_wrong_section": (_replace("  seq_len: 16", "  seq_len: 16\n  num_experts: 3"), [],
                             ["model.num_experts", "did you mean model.moe.num_experts?"]),
    "option_of_other_kind": (TINY_RECIPE + "    router:\n      kind: topk\n      p: 0.3\n", [],
                             ["model.moe.router.p", "belongs to kind 'topp'"]),
    "wrong_type": (_replace("d_model: 32", "d_model: big"), [], ["model.d_model", "expected an integer"]),
    "bool_not_int": (_replace("  seq_len: 16", "  seq_len: 16\n  tie_embeddings: 1"), [],
                     ["model.tie_embeddings", "expected true or false"]),
    "negative_size": (_replace("n_layers: 2", "n_layers: -2"), [], ["model.n_layers", "must be > 0"]),
    "missing_required": (_replace("  vocab_size: 64\n", ""), [], ["model.vocab_size", "required key is missing"]),
    "top_k_exceeds_experts": (_replace("top_k: 2", "top_k: 5"), [],
                              ["model.moe.top_k", "cannot exceed num_experts (4)"]),
    "heads_do_not_divide": (_replace("n_heads: 4", "n_heads: 5"), [],
                            ["model.n_heads", "must be divisible by n_heads"]),
    "layer_out_of_range": (_replace("layers: all", "layers: [0, 7]"), [], ["model.moe.layers", "outside 0..1"]),
    "bad_layers_word": (_replace("layers: all", "layers: most"), [], ["model.moe.layers", "'every_other'"]),
    "duplicate_key": (_replace("  d_model: 32\n", "  d_model: 32\n  d_model: 48\n"), [],
                      ["model.d_model", "duplicate key"]),
    "gate_without_shared": (_replace("layers: all", "layers: all\n    shared_mix: gate"), [],
                            ["model.moe.shared_mix", "shared_experts is 0"]),
    "bad_literal": (_replace("  seq_len: 16", "  seq_len: 16\n  activation: tanh"), [],
                    ["model.activation", "must be one of"]),
    "bad_override_syntax": (TINY_RECIPE, ["model.d_model"], ["bad override", "dotted.key=value"]),
    "bad_override_key": (TINY_RECIPE, ["model..d_model=3"], ["bad override", "not a dotted key path"]),
    "bad_override_yaml": (TINY_RECIPE, ["model.moe.layers=[0,"], ["bad override", "not valid YAML"]),
    "override_unknown_key": (TINY_RECIPE, ["model.moe.top_kk=3"],
                             ["model.moe.top_kk", "override 'model.moe.top_kk=3'", "did you mean model.moe.top_k?"]),
    "override_wrong_type": (TINY_RECIPE, ["model.d_model=abc"], ["model.d_model", "expected an integer"]),
    "override_into_value": (TINY_RECIPE, ["model.d_model.x=1"], ["model.d_model is a value, not a section"]),
    "override_semantic": (TINY_RECIPE, ["model.moe.top_k=9"], ["model.moe.top_k", "override 'model.moe.top_k=9'"]),
    "override_new_kind_lacks_key": (TINY_RECIPE + "data:\n  source:\n    kind: stdlib\n", ["data.source.kind=hf"],
                                    ["data.source.name (override 'data.source.kind=hf')", "required key is missing"]),
    "competition_with_bias_balancing": (TINY_RECIPE + "    competition: {rate: 0.1}\n    router:\n      kind: topk\n"
                                        "      bias_update_rate: 0.001\n", [],
                                        ["model.moe.router.bias_update_rate", "does not combine with competition"]),
    "extends_missing": ("extends: nowhere.yaml\n" + TINY_RECIPE, [], ["extends", "base recipe not found"]),
    "router_option_typo_without_kind": (TINY_RECIPE, ["model.moe.router.jiter_eps=0.1"],
                                        ["model.moe.router.jiter_eps (override",
                                         "did you mean model.moe.router.jitter_eps?"]),
    "renamed_key": (TINY_RECIPE + "train:\n  schedule: cosine\n", [],
                    ["train.schedule (", "this key was renamed to train.lr_schedule"]),
    "conflict_names_the_override": (TINY_RECIPE.replace("layers: all", "layers: all\n    first_dense: 1"),
                                    ["model.moe.layers=[1]"],
                                    ["model.moe.first_dense (", "tiny.yaml:15): first_dense (1)",
                                     "model.moe.layers is set at override 'model.moe.layers=[1]'"]),
    "alias_bomb": ("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
                   + "".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 9))
                   + TINY_RECIPE.replace("name: tiny", "name: *a8"), [], ["expands to more than 100,000 values"]),
    "recursive_alias": ("x: &m\n  y: *m\n" + TINY_RECIPE, [], ["recursive alias"]),
    "deep_nesting": (TINY_RECIPE + "description: " + "[" * 3000 + "]" * 3000 + "\n", [], ["nest too deeply"]),
    "nesting_past_the_bound": (TINY_RECIPE + "description: " + "[" * 70 + "]" * 70 + "\n", [],
                               ["nest more than 64 levels"]),
    "non_finite_number": (_replace("d_model: 32", "d_model: 32\n  init_std: .inf"), [],
                          ["model.init_std (", "tiny.yaml:6)", "must be a finite number"]),
    "non_finite_override": (TINY_RECIPE, ["model.moe.aux_loss_weight=.nan"],
                            ["model.moe.aux_loss_weight (override", "must be a finite number"]),
    "seed_too_large": (TINY_RECIPE, ["seed=9223372036854775808"], ["seed (override", "must be < 4294967296"]),
    "expert_choice_with_capacity": (TINY_RECIPE + "    capacity_factor: 1.0\n    router:\n      kind: expert_choice\n",
                                    [], ["model.moe.capacity_factor", "expert_choice sets its own capacity"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_broken_recipe(name, cli, write, tmp_path):
    text, overrides, expected = CASES[name]
    path = write("tiny.yaml", text) if text is not None else tmp_path / "missing.yaml"
    for command in (["build"], ["recipes", "show"]):
        result = cli(*command, path, *overrides)
        assert result.exit_code == 2, (name, result.output)
        out = result.stderr
        for needle in expected:
            assert needle in out, f"{name}: {needle!r} not in:\n{out}"
        assert "Traceback" not in result.output
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_all_errors_reported_together(cli, write):
    text = (_replace("d_model: 32", "d_model: big").replace("top_k: 2", "top_kk: 2")
            .replace("n_layers: 2", "n_layers: 0"))
    result = cli("build", write("tiny.yaml", text))
    assert result.exit_code == 2
    assert "4 problems" in result.stderr  # top_kk unknown and top_k missing
    for path in ("model.d_model", "model.moe.top_kk", "model.n_layers"):
        assert path in result.stderr


def test_error_names_file_line(cli, write):
    text = _replace("top_k: 2", "top_kk: 2")
    line = text.splitlines().index("    top_kk: 2") + 1
    result = cli("build", write("tiny.yaml", text))
    assert f"tiny.yaml:{line}" in result.stderr


def test_extends_cycle(cli, write):
    write("a.yaml", "extends: b.yaml\n" + TINY_RECIPE)
    b = write("b.yaml", "extends: a.yaml\nname: b\n")
    result = cli("build", b)
    assert result.exit_code == 2
    assert "cycle" in result.stderr


def test_errors_in_base_point_to_base_file(cli, write):
    write("base.yaml", _replace("d_model: 32", "d_model: -1"))
    child = write("child.yaml", "extends: base.yaml\nname: child\n")
    result = cli("build", child)
    assert result.exit_code == 2
    assert "model.d_model (" in result.stderr and "base.yaml:" in result.stderr


def test_build_save_refuses_existing_folder(cli, tiny_recipe, tmp_path):
    (tmp_path / "out").mkdir()
    result = cli("build", tiny_recipe, "--save", tmp_path / "out")
    assert result.exit_code == 2
    assert "already exists" in result.stderr


def test_numbers_are_read_as_yaml_1_2(cli, write, tiny_recipe):
    """`1e-3` is a float in a file and in an override (YAML 1.1 would read a string)."""
    from moectl.recipe.load import load_recipe

    rec = load_recipe(tiny_recipe, ["model.init_std=2e-2", "model.moe.aux_loss_weight=1E-3"])
    assert rec.model.init_std == 0.02 and rec.model.moe.aux_loss_weight == 0.001
    path = write("sci.yaml", TINY_RECIPE.replace("d_model: 32", "d_model: 32\n  init_std: 5e-3"))
    assert load_recipe(path).model.init_std == 0.005


def test_long_extends_chains_and_huge_files_are_refused(cli, write, tmp_path):
    for i in range(40):
        write(f"c{i}.yaml", (f"extends: c{i + 1}.yaml\n" if i < 39 else TINY_RECIPE))
    r = cli("build", tmp_path / "c0.yaml")
    assert r.exit_code == 2 and "chains more than 32 recipes" in r.stderr
    big = write("big.yaml", TINY_RECIPE + "#" * 1_200_000 + "\n")
    r = cli("build", big)
    assert r.exit_code == 2 and "not a recipe" in r.stderr


def test_a_model_too_large_to_build_is_a_message(cli, tiny_recipe):
    r = cli("build", tiny_recipe, "model.d_model=1000000000000", "model.n_heads=1")
    assert r.exit_code == 2 and "the model cannot be built" in r.stderr and "Traceback" not in r.output
