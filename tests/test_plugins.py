"""A router and a block kind from the user's own package, outside moectl, named in a recipe: they
validate as strictly as built-in parts, appear in the schema, and build, train and resume through
the CLI. Broken plugins are named in a clear message. Each CLI call is its own process, with the
package's folder on PYTHONPATH, as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, train_recipe_text
from tests.train.helpers import losses

ROUTERS = '''
from dataclasses import dataclass

import torch

from moectl.core import Router, RouterOutput, option, register_router
from moectl.core.routers import routing_losses, select_topk


@dataclass
class ScaledOptions:
    """Top-k of softmax(logits / temperature)."""

    temperature: float = option(1.0, "Divide the router logits by this before the softmax.", gt=0)


@register_router("scaled_topk", options=ScaledOptions)
class ScaledTopK(Router):
    fixed_k = True

    def __init__(self, args, index=0):
        super().__init__(args, index)
        self.add_gate()
        # computed when built, not saved: loading a run must still have it
        self.register_buffer("inv_temperature", torch.tensor(1 / self.options.temperature), persistent=False)

    def forward(self, x_TD, ctx, state=None):
        logits = self.gate_logits(x_TD) * self.inv_temperature
        probs = logits.softmax(-1)
        ids, weights = select_topk(probs, self.top_k, renormalize=True)
        return RouterOutput(ids, weights, probs, logits, aux_losses=routing_losses(probs, ids, logits, ctx),
                            state=state)
'''

BLOCKS = '''
from dataclasses import dataclass

from moectl.core import MoEBlock, option, register_block
from moectl.core.layers import RMSNorm


@dataclass
class DampedOptions:
    """h + scale * RoutedFFN(norm(h))."""

    scale: float = option(0.5, "Multiplies the routed output before the residual.", ge=0)


@register_block("damped", options=DampedOptions)
class Damped(MoEBlock):
    def __init__(self, args, layer_idx, new_routed):
        super().__init__()
        self.scale = args.moe.block.scale
        self.norm = RMSNorm(args.d_model, eps=args.norm_eps)
        self.moe = new_routed(f"L{layer_idx}")

    def forward(self, h_BSD, ctx, state):
        y_TD, state, record = self.moe(self.norm(h_BSD).flatten(0, 1), ctx, state)
        return h_BSD + self.scale * y_TD.view_as(h_BSD), state, [record]

    def flops_per_token(self):
        return self.moe.flops_per_token()
'''

BROKEN = {
    "raises": "raise ZeroDivisionError('boom')\n",
    "imports_missing": "import package_that_is_not_installed\n",
    "not_a_router": textwrap.dedent('''
        from dataclasses import dataclass
        from moectl.core import register_router

        @dataclass
        class O:
            pass

        @register_router("plain_class", options=O)
        class NotARouter:
            pass
        '''),
    "bad_output": ROUTERS.replace('"scaled_topk"', '"bad_output"').replace(
        "return RouterOutput(ids, weights, probs,", "return RouterOutput(ids[:, :1], weights, probs,"),
    "one_rank": "import os\n" + ROUTERS.replace('"scaled_topk"', '"one_rank"').replace(
        "return RouterOutput(ids, weights, probs,", "return RouterOutput(ids + 100 * (os.environ.get('RANK') == '1'), "
        "weights, probs,"),
}


@pytest.fixture
def plugin_dir(tmp_path):
    pkg = tmp_path / "plugins" / "mylab"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "routers.py").write_text(ROUTERS)
    (pkg / "blocks.py").write_text(BLOCKS)
    for name, text in BROKEN.items():
        (pkg / f"{name}.py").write_text(text)
    return tmp_path / "plugins"


def moectl(plugin_dir, *args, env=None):
    env = {**os.environ, "PYTHONPATH": f"{plugin_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    return subprocess.run([sys.executable, "-m", "moectl", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _recipe(corpus, write, router="kind: scaled_topk\n      temperature: 2.0", block="damped",
            plugins="[mylab.routers, mylab.blocks]", **train):
    text = train_recipe_text(corpus, eval_every="null", **train)
    text = text.replace("    expert_hidden: 32\n", f"    expert_hidden: 32\n    block: {block}\n"
                        f"    router:\n      {router}\n")
    return write("plugin.yaml", f"plugins: {plugins}\n{text}")


@pytest.mark.processes
@pytest.mark.train
def test_plugin_router_and_block_train_resume_and_build(plugin_dir, corpus, write, tmp_path):
    path = _recipe(corpus, write, max_steps=4, checkpoint_every=2, lr_schedule="constant")
    build = moectl(plugin_dir, "build", path, "--json")
    assert build.returncode == 0, build.stderr
    report = json.loads(build.stdout)
    assert report["moe"]["router"] == "scaled_topk" and report["moe"]["block"] == "damped"
    shown = moectl(plugin_dir, "recipes", "show", path, "model.moe.block.scale=0.25")
    assert shown.returncode == 0, shown.stderr
    assert "temperature: 2.0" in shown.stdout and "scale: 0.25" in shown.stdout
    # 4 steps straight equal 2 steps, then a resume to 4: bit for bit, like a built-in router.
    straight = moectl(plugin_dir, "train", path, "--run-dir", tmp_path / "a", "-q")
    assert straight.returncode == 0, straight.stderr
    first = moectl(plugin_dir, "train", path, "train.max_steps=2", "--run-dir", tmp_path / "b", "-q")
    assert first.returncode == 0, first.stderr
    resumed = moectl(plugin_dir, "train", path, "--run-dir", tmp_path / "b", "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and sorted(losses(tmp_path / "b")) == [1, 2, 3, 4]
    # The run folder remembers its plugins: building from it, or loading it, imports them again.
    again = moectl(plugin_dir, "build", tmp_path / "a", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["moe"]["router"] == "scaled_topk"
    code = ("import torch; from moectl.runs import load_run; run = load_run({!r}); "
            "r = run.model.layers[0].mlp.moe.router; x = torch.randint(0, 512, (1, 8)); "
            "print(type(r).__name__, float(r.inv_temperature), run.model(x).logits.shape)").format(str(tmp_path / "a"))
    env = {**os.environ, "PYTHONPATH": f"{plugin_dir}{os.pathsep}{REPO}"}
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split()[:2] == ["ScaledTopK", "0.5"]


@pytest.mark.processes
@pytest.mark.train
def test_plugin_options_are_validated_like_built_in_ones(plugin_dir, corpus, write):
    typo = moectl(plugin_dir, "build", _recipe(corpus, write, router="kind: scaled_topk\n      temperatur: 2.0"))
    builtin = moectl(plugin_dir, "build", _recipe(corpus, write, router="kind: topk\n      jitter_epss: 0.1"))
    assert typo.returncode == builtin.returncode == 2
    assert "model.moe.router.temperatur (" in typo.stderr
    assert "unknown key; did you mean model.moe.router.temperature?" in typo.stderr
    assert "unknown key; did you mean model.moe.router.jitter_eps?" in builtin.stderr
    wrong = moectl(plugin_dir, "build", _recipe(corpus, write, router="kind: scaled_topk\n      temperature: hot"))
    assert wrong.returncode == 2 and "model.moe.router.temperature" in wrong.stderr
    assert "expected a number" in wrong.stderr
    bound = moectl(plugin_dir, "build", _recipe(corpus, write, router="kind: scaled_topk\n      temperature: 0"))
    assert bound.returncode == 2 and "must be > 0" in bound.stderr
    block = moectl(plugin_dir, "build", _recipe(corpus, write, block="{kind: damped, scal: 1.0}"))
    assert block.returncode == 2 and "did you mean model.moe.block.scale?" in block.stderr
    for result in (typo, builtin, wrong, bound, block):
        assert "Traceback" not in result.stderr


@pytest.mark.processes
@pytest.mark.train
def test_schema_lists_plugin_parts(plugin_dir):
    plain = moectl(plugin_dir, "recipes", "schema")
    loaded = moectl(plugin_dir, "recipes", "schema", "--plugin", "mylab.routers", "--plugin", "mylab.blocks")
    assert plain.returncode == loaded.returncode == 0, loaded.stderr
    assert "scaled_topk" not in plain.stdout
    schema = json.loads(loaded.stdout)
    assert "ScaledTopkRouter" in schema["$defs"] and "DampedBlock" in schema["$defs"]
    props = schema["$defs"]["ScaledTopkRouter"]["properties"]["temperature"]
    assert props["exclusiveMinimum"] == 0 and "Divide the router logits" in props["description"]


@pytest.mark.processes
@pytest.mark.train
def test_entry_point_plugins_load_without_a_recipe_key(plugin_dir):
    """A package that advertises `moectl.plugins` entry points is imported on every recipe load."""
    info = plugin_dir / "mylab-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mylab\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[moectl.plugins]\nrouters = mylab.routers\n")
    result = moectl(plugin_dir, "build", "quickstart", "model.moe.router.kind=scaled_topk", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["moe"]["router"] == "scaled_topk"
    (info / "entry_points.txt").write_text("[moectl.plugins]\nbroken = mylab.raises\n")
    result = moectl(plugin_dir, "build", "quickstart")
    assert result.returncode == 2 and "the moectl plugin 'broken'" in result.stderr
    assert "ZeroDivisionError: boom" in result.stderr and "uninstall the package 'mylab'" in result.stderr


@pytest.mark.parametrize("plugin, message", [
    ("nosuchpkg.routers", "plugin.yaml:1): cannot import plugin 'nosuchpkg.routers': no module named 'nosuchpkg'"),
    ("mylab.raises", "plugin 'mylab.raises' failed to import: ZeroDivisionError: boom"),
    ("mylab.imports_missing", "plugin 'mylab.imports_missing' failed to import"),
    ("mylab.not_a_router", "must be a subclass of moectl.core.routers.Router"),
])
@pytest.mark.processes
@pytest.mark.train
def test_broken_plugins_are_named(plugin_dir, corpus, write, plugin, message):
    result = moectl(plugin_dir, "build", _recipe(corpus, write, plugins=f"[{plugin}]", router="kind: topk",
                                                 block="standard"))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.processes
@pytest.mark.train
def test_router_that_breaks_the_contract_is_named(plugin_dir, corpus, write, tmp_path):
    path = _recipe(corpus, write, plugins="[mylab.bad_output]", router="kind: bad_output", block="standard",
                   max_steps=2)
    result = moectl(plugin_dir, "train", path, "--run-dir", tmp_path / "run", "-q")
    assert result.returncode == 2, result.stderr
    assert "router 'bad_output' (mylab.bad_output.ScaledTopK) breaks the router contract" in result.stderr
    assert "weights_TK must have the shape of expert_ids_TK" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.processes
@pytest.mark.train
def test_a_router_failing_on_one_process_stops_the_run_with_its_message(plugin_dir, corpus, write, tmp_path):
    """The contract breaks on the second process only: that process says so, the first stops too
    (no hang), and the launcher exits with the failing process's code."""
    path = _recipe(corpus, write, plugins="[mylab.one_rank]", router="kind: one_rank", block="standard",
                   max_steps=2, batch_size=2)
    result = moectl(plugin_dir, "train", path, "--nproc", "2", "--run-dir", tmp_path / "run", "-q")
    assert result.returncode == 2, result.stderr
    assert "[process 1] error: router 'one_rank'" in result.stderr and "expert ids must lie in 0..3" in result.stderr
    assert "Traceback" not in result.stderr
