#!/usr/bin/env bash
# Set up moectl in ./.venv (idempotent): torch when no torch is installed yet (which build is up to
# pip and the machine's configuration), then moectl itself in editable mode. `--test` adds the test
# dependencies.
#   TORCH_SPEC       the torch requirement to install first (default: torch==2.13.0)
#   TORCH_INDEX_URL  where pip looks for it (e.g. https://download.pytorch.org/whl/cpu for the CPU build)
#   PYTHON           the interpreter that creates the venv (default: python3)
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
  pip_install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.13.0}"
fi
pip_install -e ".${extras}"
