"""LoRA training throughput of LLMGen at fp32 against ``llm_dtype: auto``, in one run.

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
    args, rest = parser.parse_known_args()
    sys.argv = sys.argv[:1]

    from _harness import prepare
    from recbole.data.dataloader import TrainDataLoader

    from recbole_llmgen import finetune
    from recbole_llmgen.cli import parse_overrides
    from recbole_llmgen.quick_start import build_model
    from recbole_llmgen.trainer import LLMGenTrainer

    overrides = parse_overrides(rest)
    out = tempfile.mkdtemp(prefix="bench_train-")
    result = {"examples": args.examples}
    for method, dtype in [(m, d) for m in ("likelihood", "verbalizer") for d in ("float32", "auto")]:
        config_dict = {
            "train_mode": "lora",
            "score_method": method,
            "llm_dtype": dtype,
            "checkpoint_dir": os.path.join(out, "saved"),
            "show_progress": False,
            "state": "ERROR",
            **overrides,
        }
        config, train_data, _, _ = prepare("LLMGen", "ml-100k", config_dict)
        model = build_model(config, train_data)
        trainer = LLMGenTrainer(config, model)
        recent = finetune.bounded_train_loader(train_data, 1)._dataset
        batch = config["train_batch_size"]

        def loader(rows, recent=recent, config=config):
            subset = recent.copy(recent.inter_feat[torch.arange(rows)])
            return TrainDataLoader(config, subset, None, shuffle=False)

        trainer._train_epoch(loader(batch), 0)  # warm-up step
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


if __name__ == "__main__":
    main()
