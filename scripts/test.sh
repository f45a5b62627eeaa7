#!/usr/bin/env bash
# Installs (if needed), lints and runs the test suite on the CPU. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # nothing phones home
.venv/bin/ruff check recbole_llmgen tests benchmarks
.venv/bin/ruff format --check recbole_llmgen tests benchmarks
.venv/bin/python -m pytest -q "$@"
