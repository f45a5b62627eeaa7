#!/usr/bin/env bash
# Installs (if needed) and runs the main job: LLMGen zero-shot on the bundled MovieLens-100k with the
# bundled SmolLM2-135M-Instruct, full ranking of all 943 test users, printing RecBole's metrics.
# Extra --key=value arguments are passed on, e.g.: bash scripts/main.sh --score_method=verbalizer
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p results
.venv/bin/recbole-llmgen run --model LLMGen --dataset ml-100k --json results/llmgen_ml-100k.json "$@"
