"""The command line as a user meets it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO


def test_help_lists_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0
    rows = [line.strip("│ ").split() for line in result.output.splitlines()]
    commands = {row[0] for row in rows if row}   # first word of each row of the Commands panel
    assert {"build", "train", "data", "recipes"} <= commands


@pytest.mark.parametrize("command", ["train", "eval", "convert", "profile", "compare", "build", "generate"])
def test_flags_show_no_type(cli, command):
    """On/off flags take no value: --help shows no `<bool>` beside them; valued options keep theirs."""
    out = cli(command, "--help").output
    assert "--help" in out and "<bool>" not in out


@pytest.mark.processes
def test_help_does_not_import_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "moectl", "--help"],
                          capture_output=True, text=True, cwd=REPO, check=True)
    modules = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
               if line.startswith("import time:")}
    assert "typer" in modules          # the probe sees imports at all
    assert "torch" not in modules
    assert "pydantic" not in modules
    assert "build" in proc.stdout


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.output.startswith("moectl ")


def test_recipes_list_shows_shipped(cli):
    from moectl.recipe.load import shipped_name, shipped_recipes

    result = cli("recipes", "list")
    assert result.exit_code == 0
    names = [shipped_name(p) for p in shipped_recipes()]
    assert {"quickstart", "baselines/smoe-share-base", "papers/rmoe/rmoe-enwik8-tiny"} <= set(names)
    listed = result.output.replace("\n", "")   # a long name may fold over lines, but is never cut
    for name in names:
        assert name in listed, name


def test_recipes_show_resolves(cli):
    result = cli("recipes", "show", "baselines/smoe-share-base", "model.moe.top_k=1")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.stdout)
    assert data["model"]["d_model"] == 768            # from the base via extends
    assert data["model"]["moe"]["top_k"] == 1         # the override
    assert data["model"]["moe"]["capacity_factor"] is None  # a default filled in
    assert "extends" not in data


def test_override_kind_starts_section_afresh(cli):
    result = cli("recipes", "show", "baselines/topp-base", "model.moe.router.kind=hash")
    assert result.exit_code == 0, result.output
    router = yaml.safe_load(result.stdout)["model"]["moe"]["router"]
    assert router == {"kind": "hash", "seed": 0}


def test_recipes_validate(cli, tiny_recipe, write):
    assert cli("recipes", "validate").exit_code == 0
    assert cli("recipes", "validate", tiny_recipe, "model.moe.top_k=1").exit_code == 0
    bad = write("bad.yaml", "model: 3\n")
    result = cli("recipes", "validate", tiny_recipe, bad)
    assert result.exit_code == 2
    assert "ok" in result.stdout and "bad.yaml" in result.stderr


def test_schema_to_file(cli, tmp_path):
    out = tmp_path / "schema.json"
    assert cli("recipes", "schema", "--output", out).exit_code == 0
    assert json.loads(out.read_text())["title"] == "moectl recipe"


def test_extends_shipped_name(cli, write):
    child = write("child.yaml", "extends: baselines/dense-base\nname: child\nmodel:\n  n_layers: 2\n")
    result = cli("recipes", "show", child)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["model"]["n_layers"] == 2


@pytest.mark.parametrize("args", [["nosuchcommand"], ["build"], ["build", "quickstart", "--bogus"]])
def test_usage_errors_exit_2(cli, args):
    assert cli(*args).exit_code == 2
