"""The engine as a flat folder: the import rewrite rules, what is refused, what transformers' loader
finds in an exported folder, the thin wrapper, and the engine arguments as JSON."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import moectl.core  # noqa: F401  (registers the engine's parts)
from moectl.convert.flatten import (
    LOADER_IMPORT,
    TEMPLATE,
    WRAPPER,
    Source,
    flat_modules,
    flat_name,
    rewrite_imports,
)
from moectl.core import registry
from moectl.core.config import ModelArgs, MoEArgs
from moectl.errors import MoectlError

CORE = ("moectl.core", "moectl.core.layers", "moectl.core.model", "moectl.core.registry", "moectl.core.config",
        "moectl.core.routers.topk")
FLAT = {m: flat_name(m) for m in CORE}

SOURCE = '''"""Text is left alone: from moectl.core import x."""
from __future__ import annotations

import os, moectl.core.layers as layers
from moectl.core.model import (  # noqa: F401
    A,
    B as C,
)
from moectl.core import registry, config as cfg
from moectl.core.config import *


def f():
    import moectl.core  # noqa: F401  (registers the parts)
    from moectl.core import (
        registry,
        model,
    )
    from moectl.core.routers.topk import select_topk
    return os, layers, A, C, registry, cfg, model, select_topk
'''

EXPECTED = '''"""Text is left alone: from moectl.core import x."""
from __future__ import annotations

import os; from . import moectl_core_layers as layers
from .moectl_core_model import (  # noqa: F401
    A,
    B as C,
)
from . import moectl_core_registry as registry, moectl_core_config as cfg
from .moectl_core_config import *


def f():
    from . import moectl_core  # noqa: F401  (registers the parts)
    from . import moectl_core_registry as registry, moectl_core_model as model



    from .moectl_core_routers_topk import select_topk
    return os, layers, A, C, registry, cfg, model, select_topk
'''


def test_import_rewrite_rules():
    """Attribute imports keep their layout with the module's flat name; module imports become
    `from . import name as x`; every line keeps its number; the loader sees what it must."""
    out = rewrite_imports(SOURCE, Source("moectl.core.example", Path("example.py")), FLAT)
    assert out == EXPECTED
    compile(out, "example.py", "exec")
    assert set(LOADER_IMPORT.findall(out)) == {"moectl_core_model", "moectl_core_config", "moectl_core_routers_topk"}
    assert rewrite_imports("import os\nfrom torch import nn\n", Source("moectl.core.x", Path("x.py")), FLAT) == \
        "import os\nfrom torch import nn\n"


PLUGIN = Source("exportlab.routers", Path("routers.py"), "the router 'p' (P in exportlab.routers)")


@pytest.mark.parametrize("source,text,message", [
    (Source("moectl.core.x", Path("x.py")), "import moectl.core\nmoectl.core.registry\n",
     "moectl's engine module moectl.core.x cannot be exported: moectl.core.x uses the name moectl after "
     "`import moectl.core`"),
    (Source("moectl.core.x", Path("x.py")), "from moectl.recipe.load import validate\n",
     "imports moectl.recipe.load.validate, which the folder would not hold"),
    (Source("moectl.core.x", Path("x.py")), "import os; from moectl.core import registry\n",
     "shares a line with another statement"),
    (PLUGIN, "from . import helpers\n", "the router 'p' (P in exportlab.routers) cannot be exported: "
     "exportlab.routers has a relative import (from . import helpers)"),
    (PLUGIN, "from exportlab.common import helper\n", "imports exportlab.common.helper, which the folder would not "
     "hold"),
    (PLUGIN, "import moectl\n", "imports moectl, which the folder would not hold"),
])
def test_what_the_folder_cannot_hold_is_refused(source, text, message):
    with pytest.raises(MoectlError) as e:
        rewrite_imports(text, source, FLAT)
    assert message in str(e.value)
    assert "plugin module" in e.value.hint


def test_a_plugin_imports_installed_packages_and_the_engine():
    text = "import numpy as np\nfrom moectl.core.model import A\n"
    assert rewrite_imports(text, PLUGIN, FLAT) == "import numpy as np\nfrom .moectl_core_model import A\n"


def _args(**moe) -> ModelArgs:
    return ModelArgs(vocab_size=96, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48,
                     moe=MoEArgs(num_experts=4, top_k=2, expert_hidden=16, layers=[0, 1], **moe))


def test_the_loader_finds_every_module_and_no_moectl_import(tmp_path):
    """transformers' own loader functions, on an exported folder: from modeling_moectl.py the
    `from .name import` lines reach every module written, and no file imports moectl."""
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    files = flat_modules(_args(block=registry.blocks.default_options("cartesian")))
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    reached = {Path(f).name for f in get_relative_import_files(tmp_path / f"{WRAPPER}.py")}
    assert reached == set(files) - {f"{WRAPPER}.py"}
    for name in files:
        assert "moectl" not in get_imports(tmp_path / name), name


def test_the_wrapper_only_wraps_the_engine():
    """convert/remote/ holds the wrapper template alone; it defines the config and the model class
    and imports the engine's modules, with no layer of its own."""
    assert [p.name for p in TEMPLATE.parent.iterdir() if p.suffix == ".py"] == [TEMPLATE.name]
    tree = ast.parse(TEMPLATE.read_text())
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert classes == {"MoectlConfig", "MoectlForCausalLM"}
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and
                any(getattr(b, "attr", getattr(b, "id", "")) == "Module" for b in n.bases)]
    relative = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 1}
    assert relative and all(m.startswith("moectl_core") for m in relative)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "model"
             and isinstance(n.func.value, ast.Name) and n.func.value.id == "self"]
    assert len(calls) == 1   # the engine's forward is called in one place


def every_part_args() -> list[ModelArgs]:
    """A model per registered router, block kind and variant, with non-default options where the
    options have them."""
    out = []
    for reg, key in ((registry.routers, "router"), (registry.blocks, "block"), (registry.variants, "variant")):
        for e in reg:
            out.append(_args(**{key: e.options()}))
    out.append(_args(router=registry.routers.get("recurrent").options(hidden=8, cell="lstm", shared_projector=True),
                     shared_experts=2, shared_mix="gate"))
    return out


@pytest.mark.parametrize("args", every_part_args(), ids=lambda a: f"{type(a.moe.router).__name__}-"
                         f"{type(a.moe.block).__name__}-{type(a.moe.variant).__name__}")
def test_engine_arguments_round_trip_through_json(args):
    data = json.loads(json.dumps(args.to_dict()))
    assert ModelArgs.from_dict(data) == args
    moe = data["moe"]
    assert moe["router"]["kind"] == registry.routers.of(args.moe.router).name
    assert moe["block"]["kind"] == registry.blocks.of(args.moe.block).name
    assert (moe["variant"] or {}).get("kind") == (registry.variants.of(args.moe.variant).name
                                                    if args.moe.variant is not None else None)
    dense = ModelArgs(vocab_size=8, d_model=8, n_layers=1, n_heads=2, ffn_hidden=0, rope_scaling={"kind": "linear",
                                                                                               "factor": 2.0})
    assert ModelArgs.from_dict(json.loads(json.dumps(dense.to_dict()))) == dense
