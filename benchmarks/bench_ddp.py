"""One process vs two on the same work: ``recbole_llmgen.run_recbole`` with ``nproc=1`` and
``nproc=2`` (gloo on CPU, or NCCL with one GPU each) on the first ``--users`` users of ml-100k.

Default work: zero-shot LLMGen with the bundled model, one validation pass and the test pass
(full ranking, LS split). ``--train_mode=lora`` (any ``--key=value`` is a config override) adds
LoRA training; training shards differ between 1 and 2 processes, so only the zero-shot metrics
are expected to be equal. On CPU each of the two ranks gets half the cores (the one-process run
uses them all), so the figure is the gain from splitting the work, not from more hardware.

    python benchmarks/bench_ddp.py [--users 100] [--key=value ...]

Last line: one JSON object with seconds_1proc, seconds_2proc, speedup, metrics_equal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

import recbole_llmgen  # noqa: F401  (compatibility fixes, LLMGen registered)
from recbole_llmgen.cli import parse_overrides
from recbole_llmgen.distributed import free_port
from recbole_llmgen.integration import recbole_argv
from recbole_llmgen.quick_start import run_recbole


def subset_of_ml100k(root: str, users: int) -> str:
    """``root/ml-100k-uN``: ml-100k's interactions of users 1..N and every item."""
    import recbole

    source = os.path.join(os.path.dirname(recbole.__file__), "dataset_example", "ml-100k")
    name = f"ml-100k-u{users}"
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(source, "ml-100k.inter"), encoding="utf-8") as f:
        header, *rows = f.read().splitlines()
    kept = [row for row in rows if int(row.split("\t")[0]) <= users]
    with open(os.path.join(folder, f"{name}.inter"), "w", encoding="utf-8") as f:
        f.write("\n".join([header, *kept]) + "\n")
    with open(os.path.join(source, "ml-100k.item"), encoding="utf-8") as f:
        items = f.read()
    with open(os.path.join(folder, f"{name}.item"), "w", encoding="utf-8") as f:
        f.write(items)
    return name


def timed_run(dataset: str, config: dict, nproc: int) -> tuple[dict, float]:
    start = time.perf_counter()
    with recbole_argv():
        result = run_recbole(
            model="LLMGen", dataset=dataset, config_dict=dict(config), saved=True, nproc=nproc, port=free_port()
        )
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100, help="the first N users of ml-100k")
    args, rest = parser.parse_known_args()
    overrides = parse_overrides(rest)
    sys.argv = sys.argv[:1]

    out = tempfile.mkdtemp(prefix="bench_ddp-")
    dataset = subset_of_ml100k(out, args.users)
    config = {
        "data_path": out,
        "load_col": None,
        "checkpoint_dir": os.path.join(out, "saved"),
        "num_candidates": 10,
        "max_history_items": 5,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "eval_batch_size": 8,  # batches alternate between ranks: small batches balance them
        "show_progress": False,
        "log_wandb": False,
        "state": "WARNING",
        **overrides,
    }
    one, seconds_1 = timed_run(dataset, config, 1)
    two, seconds_2 = timed_run(dataset, config, 2)
    device = "cuda" if torch.cuda.is_available() and config.get("use_gpu", True) else "cpu"
    print(f"\n{args.users} users of ml-100k, LLMGen train_mode {config.get('train_mode', 'none')}, {device}")
    print("| processes | seconds | test NDCG@10 | test Hit@10 | valid NDCG@10 |")
    print("|---|---|---|---|---|")
    for n, result, seconds in ((1, one, seconds_1), (2, two, seconds_2)):
        print(
            f"| {n} | {seconds:.1f} | {result['test_result']['ndcg@10']:.4f} | "
            f"{result['test_result']['hit@10']:.4f} | {result['best_valid_result']['ndcg@10']:.4f} |"
        )
    summary = {
        "seconds_1proc": round(seconds_1, 1),
        "seconds_2proc": round(seconds_2, 1),
        "speedup": round(seconds_1 / seconds_2, 2),
        "metrics_equal": dict(one["test_result"]) == dict(two["test_result"])
        and dict(one["best_valid_result"]) == dict(two["best_valid_result"]),
        "test_ndcg@10_1proc": one["test_result"]["ndcg@10"],
        "test_ndcg@10_2proc": two["test_result"]["ndcg@10"],
        "users": args.users,
        "train_mode": config.get("train_mode", "none"),
        "device": device,
        "cpu_count": os.cpu_count(),
        "threads_1proc": torch.get_num_threads(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
