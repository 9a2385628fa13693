"""The optional extras: declared once in pyproject.toml, and install hints that name them exactly."""

from __future__ import annotations

import shlex
import sys

import pytest

from moectl import extras
from tests.conftest import REPO


def _declared() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_fallback_table_is_pyproject():
    declared = _declared()
    for extra, reqs in extras.DECLARED.items():
        assert reqs == declared[extra], extra


def test_all_extra_is_every_feature_extra():
    declared = _declared()
    features = {r for name, reqs in declared.items() if name not in ("all", "test") for r in reqs}
    assert set(declared["all"]) == features


def test_install_command_targets_this_interpreter():
    for extra in extras.DECLARED:
        words = shlex.split(extras.install_command(extra))
        assert words[:4] == [sys.executable, "-m", "pip", "install"]
        assert sorted(words[4:]) == sorted(_declared()[extra])
    assert extras.install_hint("plot").startswith("install it: ") and "'plot' extra" in extras.install_hint("plot")
