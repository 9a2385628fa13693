"""Optional extras: which packages each one adds, and the command that installs them here.

The extras are declared once, in pyproject.toml; this module reads them from the installed
package's metadata (a source tree that is not installed falls back to `DECLARED`, which a test
keeps equal to pyproject.toml). A hint built by `install_hint` names this environment's own
interpreter, so pasting it into a shell installs into the environment moectl runs in.
"""

from __future__ import annotations

import re
import shlex
import sys
from importlib import metadata

DECLARED = {
    "hf": ["transformers>=4.45", "datasets>=2.19"],
    "data": ["datasets>=2.19", "pyarrow>=14"],
    "tb": ["tensorboard>=2.14"],
    "plot": ["matplotlib>=3.7"],
    "triton": ["triton>=3.0"],
    "eval": ["lm-eval>=0.4"],
    "wandb": ["wandb>=0.19"],
    "mlflow": ["mlflow-skinny>=3", "sqlalchemy>=2", "alembic>=1.13"],
}


def requirements(extra: str) -> list[str]:
    """The requirement strings of one extra, as declared."""
    try:
        declared = metadata.requires("moectl") or []
    except metadata.PackageNotFoundError:
        declared = []
    found = []
    for line in declared:
        requirement, _, marker = line.partition(";")
        if re.search(r"""extra\s*==\s*["']""" + re.escape(extra) + r"""["']""", marker):
            found.append(requirement.strip())
    return found or list(DECLARED[extra])


def install_command(extra: str) -> str:
    """A shell command that installs the extra's packages into the running interpreter."""
    return " ".join([shlex.quote(sys.executable), "-m", "pip", "install",
                     *(shlex.quote(r) for r in requirements(extra))])


def install_hint(extra: str) -> str:
    """'install it: <command> (the <extra> extra)' for error messages and warnings."""
    return f"install it: {install_command(extra)} (moectl's '{extra}' extra)"
