"""LoRA training throughput of LLMGen: the two training objectives, and fp32 against ``llm_dtype: auto``.

Objectives (always; ``prompt_format: list``, the same model, dtype and ``max_history_items`` for
both): ``next_item`` trains one (history, next item) prompt per example, ``sequence`` a window of
``max_history_items + 1`` training items per row with the loss on every item after the first.
Both through LLMGenTrainer's own training epoch; a warm-up step first. Keys
``per_prompt_predictions_per_s``, ``sequence_predictions_per_s``, ``ratio`` (sequence / per
prompt), tokens per prediction of each.
    python benchmarks/bench_train.py [--examples 48] [--windows 16] [--history 20] [--dtypes] [--key=value ...]

``--dtypes`` (issue 13's measurement):

The same ml-100k training examples (each user's most recent (history, next item) pair, real
10-title prompts), the bundled SmolLM2-135M-Instruct, LoRA r=8 on every linear layer, RecBole's
batch of 16 rows as micro-batches of 4, through LLMGenTrainer's own training epoch (autocast,
gradient accumulation, clipping, optimizer step). The first step of each run is a warm-up.
    python benchmarks/bench_train.py [--examples 48] [--key=value ...]
Both training losses on main: ``likelihood`` (causal-LM loss on the target's tokens) and
``verbalizer`` (cross-entropy of the target's letter among the listed candidates).
The last line is one JSON object: predictions (trained next-item targets) per second per method
and dtype, and the speed-up of auto over fp32 per method.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=48, help="timed training examples (after a warm-up step)")
    parser.add_argument("--windows", type=int, default=16, help="timed training windows (sequence objective)")
    parser.add_argument("--history", type=int, default=20, help="max_history_items of both objectives")
    parser.add_argument("--dtypes", action="store_true", help="also fp32 against auto for both losses (slow)")
    args, rest = parser.parse_known_args()
    sys.argv = sys.argv[:1]

    from recbole_llmgen.cli import parse_overrides

    overrides = parse_overrides(rest)
    out = tempfile.mkdtemp(prefix="bench_train-")
    result = {"examples": args.examples, "windows": args.windows, "max_history_items": args.history}
    result.update(objectives(args, overrides, out))
    print(
        f"per prompt {result['per_prompt_predictions_per_s']}/s, sequence {result['sequence_predictions_per_s']}/s: "
        f"ratio {result['ratio']}",
        flush=True,
    )
    runs = [(m, d) for m in ("likelihood", "verbalizer") for d in ("float32", "auto")] if args.dtypes else []
    for method, dtype in runs:
        config, train_data, model, trainer = lora_run(out, overrides, score_method=method, llm_dtype=dtype)
        loader = recent_examples(config, train_data)
        trainer._train_epoch(loader(config["train_batch_size"]), 0)  # warm-up step
        timed = loader(args.examples)
        start = time.perf_counter()
        loss = trainer._train_epoch(timed, 1)
        seconds = time.perf_counter() - start
        name = str(model.llm.dtype).removeprefix("torch.")
        key = f"{method}_{dtype}"
        result[f"per_prompt_predictions_per_s_{key}"] = round(args.examples / seconds, 3)
        result[f"step_seconds_{key}"] = round(seconds / len(timed), 2)
        result[f"mean_loss_{key}"] = round(loss / len(timed), 4)
        if dtype == "auto":
            result["auto_dtype"] = name
            result[f"speedup_auto_vs_fp32_{method}"] = round(
                result[f"per_prompt_predictions_per_s_{key}"]
                / result[f"per_prompt_predictions_per_s_{method}_float32"],
                2,
            )
        print(
            f"{method}, {dtype} (weights {name}, autocast {model.autocast_dtype}): {args.examples} examples in "
            f"{seconds:.1f} s, {args.examples / seconds:.2f}/s, mean loss {loss / len(timed):.3f}",
            flush=True,
        )
    print(json.dumps(result))


def lora_run(out: str, overrides: dict, **settings):
    """(config, train data, model, trainer) of a LoRA LLMGen on ml-100k with ``settings``."""
    from _harness import prepare

    from recbole_llmgen.integration import build_model
    from recbole_llmgen.trainer import LLMGenTrainer

    config_dict = {
        "train_mode": "lora",
        "checkpoint_dir": os.path.join(out, "saved"),
        "show_progress": False,
        "state": "ERROR",
        **settings,
        **overrides,
    }
    config, train_data, _, _ = prepare("LLMGen", "ml-100k", config_dict)
    model = build_model(config, train_data)
    return config, train_data, model, LLMGenTrainer(config, model)


def recent_examples(config, train_data):
    """A loader factory over each user's most recent (history, next item) row: ``loader(rows)``."""
    from recbole.data.dataloader import TrainDataLoader

    from recbole_llmgen import finetune

    recent = finetune.bounded_train_loader(train_data, 1)._dataset

    def loader(rows):
        subset = recent.copy(recent.inter_feat[torch.arange(rows)])
        return TrainDataLoader(config, subset, None, shuffle=False)

    return loader


def objectives(args, overrides: dict, out: str) -> dict:
    """Next-item predictions trained per second by each objective, one model, one run."""
    from recbole_llmgen import sequence

    config, train_data, model, trainer = lora_run(
        out,
        overrides,
        prompt_format="list",
        llm_train_objective="sequence",
        max_history_items=args.history,
        train_batch_size=8,
        llm_train_batch_size=8,
    )
    result = {"dtype": str(model.llm.dtype).removeprefix("torch."), "autocast": str(model.autocast_dtype)}

    # per prompt: each user's most recent (history, next item) rows, micro-batches of llm_train_batch_size
    prompts = recent_examples(config, train_data)

    def prompt_tokens(loader):
        total = 0
        for batch in loader:
            seq, lengths = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
            for b, target in enumerate(batch[model.ITEM_ID].tolist()):
                total += len(model.prompts.build(seq[b, : lengths[b]].tolist(), reserve_tokens=0))
                total += len(model.prompts.item_token_ids[target])
        return total

    trainer._train_epoch(prompts(config["train_batch_size"]), 0)  # warm-up step
    timed = prompts(args.examples)
    start = time.perf_counter()
    trainer._train_epoch(timed, 1)
    seconds = time.perf_counter() - start
    result["per_prompt_predictions_per_s"] = round(args.examples / seconds, 3)
    result["per_prompt_tokens_per_prediction"] = round(prompt_tokens(timed) / args.examples, 1)

    # sequence: full windows of the epoch's first batches
    windows = sequence.window_loader(train_data, model, config["train_batch_size"], int(config["seed"]))
    full = [w for w in windows.items if len(w) == args.history + 1]

    def window_batches(count, offset=0):
        chosen = full[offset : offset + count]
        lengths = [model.prompts.list_length(w) for w in chosen]
        return sequence.WindowLoader(train_data._dataset, chosen, lengths, config["train_batch_size"], 0)

    trainer._train_epoch(window_batches(config["train_batch_size"], offset=len(full) - config["train_batch_size"]), 0)
    timed = window_batches(args.windows)
    start = time.perf_counter()
    trainer._train_epoch(timed, 1)
    seconds = time.perf_counter() - start
    predictions = timed.predictions
    rows, _ = model.prompts.window_rows(timed.items)
    result["sequence_predictions_per_s"] = round(predictions / seconds, 3)
    result["sequence_tokens_per_prediction"] = round(sum(len(r) for r in rows) / predictions, 1)
    result["sequence_tokens_per_s"] = round(sum(len(r) for r in rows) / seconds, 1)
    result["epoch_predictions"] = windows.predictions
    result["epoch_minutes_estimate"] = round(windows.predictions / result["sequence_predictions_per_s"] / 60, 1)
    result["ratio"] = round(result["sequence_predictions_per_s"] / result["per_prompt_predictions_per_s"], 2)
    return result


if __name__ == "__main__":
    main()
