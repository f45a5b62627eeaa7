"""Settings of the benchmark's classic models, chosen on the valid split only.

Each cell of a small grid runs exactly as a benchmark row does (:func:`recbole_llmgen.benchmark.model_config`:
the leave-one-out split in time order, full ranking, ``seen_items`` rule, the benchmark's defaults for the
model, its own process), trains until validation stops improving, and is ranked by its best valid
NDCG@10. The test split is never printed: the winner's settings go into ``MODEL_DEFAULTS`` by hand,
and the benchmark reports its test numbers. Rows go to ``OUT/choose-MODEL.jsonl`` (one per cell, kept:
a rerun skips finished cells); the last line printed is a JSON object of every cell's valid result.

    python benchmarks/choose_classic.py --model SASRec --grid '{"hidden_dropout_prob": [0.2, 0.5]}'
    python benchmarks/choose_classic.py --model SASRec --grid '...' --paired '{"attn_dropout_prob": "hidden_dropout_prob"}'

``--paired`` gives a key the value of another grid key in each cell (e.g. both dropouts together).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.argv, ARGS = sys.argv[:1], sys.argv[1:]  # RecBole reads --key=value from sys.argv

from recbole_llmgen import benchmark  # noqa: E402


def cells(grid: dict, paired: dict) -> list[dict]:
    keys = list(grid)
    found = []
    for values in itertools.product(*(grid[k] for k in keys)):
        cell = dict(zip(keys, values))
        cell.update({k: cell[source] for k, source in paired.items()})
        found.append(cell)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--grid", required=True, help="JSON: {key: [values]}")
    parser.add_argument("--paired", default="{}", help="JSON: {key: grid key whose value it takes}")
    parser.add_argument("--set", default="{}", help="JSON: settings of every cell (over the benchmark's defaults)")
    parser.add_argument("--out", default="results/choose-classic")
    args = parser.parse_args(ARGS)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    path = os.path.join(args.out, f"choose-{args.model}.jsonl")
    done = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            done = {row["hash"]: row for row in map(json.loads, f)}
    summary = []
    for number, cell in enumerate(cells(json.loads(args.grid), json.loads(args.paired)), 1):
        overrides = {**json.loads(args.set), **cell}
        config = benchmark.model_config(args.model, args.dataset, "full", overrides, args.out)
        spec = {"model": args.model, "dataset": args.dataset, "config": config, "config_files": None}
        digest = benchmark.run_hash(spec)
        if digest not in done:
            log = os.path.join(args.out, "runs", f"{args.model}-{digest}.log")
            row = benchmark.run_in_subprocess(spec, log)
            keep = (
                "status",
                "error",
                "best_valid_score",
                "valid_ndcg@10",
                "valid_hit@10",
                "epochs_trained",
                "best_epoch",
                "stopped_by",
                "train_seconds",
                "valid_curve",
            )  # fmt: skip  (no test metric)
            done[digest] = {"hash": digest, "cell": overrides, **{k: row.get(k) for k in keep}}
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(done[digest]) + "\n")
        row = done[digest]
        best = None if row.get("best_epoch") is None else row["best_epoch"] + 1
        print(f"[{number}] {json.dumps(cell)}: valid NDCG@10 {row.get('valid_ndcg@10')}, best epoch {best} of "
              f"{row.get('epochs_trained')} ({row.get('stopped_by')}), {row.get('train_seconds')} s", flush=True)  # fmt: skip
        summary.append({"cell": cell, **{k: row.get(k) for k in ("valid_ndcg@10", "epochs_trained", "train_seconds")}})
    print(json.dumps({"model": args.model, "cells": summary}))


if __name__ == "__main__":
    main()
