#!/usr/bin/env bash
# Installs (if needed) and runs the main job: `recbole-llmgen benchmark` on the bundled MovieLens-100k
# (Pop; BPR, SASRec, GRU4Rec and LightGCN each trained until validation stops improving; the text
# retriever; LLMGen with the bundled SmolLM2-135M-Instruct reranking the best candidate source), same
# split, evaluator and ranking rule (seen_items: mask) for all. Writes results/benchmark-ml-100k-full/
# benchmark.csv, benchmark.md and benchmark.png; a rerun reuses finished models. LLMGen runs in
# min(2, cores) processes (RecBole's multi-process mode: same metrics, faster; --llm-nproc 1 to turn off).
# Extra arguments are passed on, e.g.: bash scripts/main.sh --protocol uni19 --train_mode=lora
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/recbole-llmgen benchmark --dataset ml-100k --llm-nproc auto "$@"
