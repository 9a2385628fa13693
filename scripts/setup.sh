#!/usr/bin/env bash
# Set up moectl in ./.venv (idempotent): the CPU build of torch when no torch is installed yet,
# then moectl itself in editable mode. `--test` adds the test dependencies.
#   TORCH_SPEC   the torch requirement to install first (default: torch==2.13.0)
#   PYTHON       the interpreter that creates the venv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing ${TORCH_SPEC:-torch==2.13.0}" >&2
  pip_install "${TORCH_SPEC:-torch==2.13.0}"
fi
pip_install -e ".${extras}"
