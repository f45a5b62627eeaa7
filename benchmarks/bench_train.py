"""LoRA training throughput of LLMGen against this CPU's own matmul peak, and the evaluation
speed of a LoRA model merged and unmerged, in one run.

Objectives (always; ``prompt_format: list``, titles only, LoRA r16 as
``configs/llmgen_ml-100k_finetune.yaml`` trains): ``next_item`` trains one (history, next item)
prompt per example, ``sequence`` a window of ``max_history_items + 1`` training items per row with
the loss on every item after the first, timed on a seeded sample of the epoch's own windows (best
of 3 epochs over them, after a warm-up step), through LLMGenTrainer's own training epoch.
Keys: ``predictions_per_s`` (= ``sequence_predictions_per_s``), ``achieved_gflops`` (useful FLOPs:
see ``training_flops``), ``peak_gflops`` (the best bf16/fp32 matmul at the model's linear shapes,
same run), ``fraction_of_peak``, ``epoch_estimate_s`` (ml-100k's epoch of sequence predictions),
``per_prompt_predictions_per_s``, ``ratio`` (sequence / per prompt), tokens per prediction;
``eval_users_per_s_base|unmerged|merged`` (likelihood over 20 candidates on ``--eval-users`` test
users: the zero-shot model, the LoRA model unmerged, merged as evaluation runs it since issue 25).
``--levers``: each training lever alone on the same windows (the fused chunked loss, eager
attention, ``torch.compile`` of the decoder layers with its compile time).
    python benchmarks/bench_train.py [--examples 16] [--windows 32] [--history 20] [--eval-users 48] [--levers] [--dtypes]

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

import numpy as np
import torch
from bench_scoring import matmul_peak_gflops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=16, help="timed training examples (after a warm-up step)")
    parser.add_argument("--windows", type=int, default=32, help="timed training windows (sequence objective)")
    parser.add_argument("--history", type=int, default=20, help="max_history_items of both objectives")
    parser.add_argument("--dtypes", action="store_true", help="also fp32 against auto for both losses (slow)")
    parser.add_argument(
        "--levers", action="store_true", help="each training lever alone (fused loss, attention, compile)"
    )
    parser.add_argument("--eval-users", type=int, default=48, help="test users per evaluation timing (0: none)")
    parser.add_argument(
        "--item_id_format",
        default="title",
        choices=["title", "token"],
        help="token: the sequence objective with one token per item against titles on the same windows "
        "(predictions_per_s, epoch_estimate_s, tokens_per_prediction, speedup_vs_title)",
    )
    args, rest = parser.parse_known_args()
    sys.argv = sys.argv[:1]

    from recbole_llmgen.cli import parse_overrides

    overrides = parse_overrides(rest)
    out = tempfile.mkdtemp(prefix="bench_train-")
    if args.item_id_format != "title":
        print(json.dumps(formats(args, overrides, out)))
        return
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
        item_text_template="{movie_title}",  # as configs/llmgen_ml-100k_finetune.yaml trains
        lora_r=16,
        lora_alpha=32,
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

    # sequence: a seeded sample of the epoch's own windows (its mix of lengths), batched as the epoch batches them
    windows = sequence.window_loader(train_data, model, config["train_batch_size"], int(config["seed"]))
    rng = np.random.default_rng(0)
    sample = [windows.items[i] for i in rng.choice(len(windows.items), size=2 * args.windows, replace=False)]

    def window_batches(chosen):
        lengths = [model.prompts.list_length(w) for w in chosen]
        return sequence.WindowLoader(train_data._dataset, chosen, lengths, config["train_batch_size"], 0)

    warm, timed = (
        window_batches(sample[args.windows :][: config["train_batch_size"]]),
        window_batches(sample[: args.windows]),
    )
    rows, spans = model.prompts.window_rows(timed.items)
    predicted_tokens = sum(end - start for row in spans for start, end in row)

    def rate(repeats: int = 3) -> float:
        """Best predictions/s of ``repeats`` timed epochs over the same windows (after a warm-up step)."""
        trainer._train_epoch(warm, 0)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            trainer._train_epoch(timed, 1)
            best = min(best, time.perf_counter() - start)
        return timed.predictions / best

    predictions_per_s = rate()
    flops = training_flops(model.llm, rows, predicted_tokens)
    peak, shapes = matmul_peak_gflops(model.llm, model.llm.dtype, 1024)
    seconds = timed.predictions / predictions_per_s
    result["sequence_predictions_per_s"] = result["predictions_per_s"] = round(predictions_per_s, 3)
    result["sequence_tokens_per_prediction"] = round(sum(len(r) for r in rows) / timed.predictions, 1)
    result["sequence_tokens_per_s"] = round(sum(len(r) for r in rows) / seconds, 1)
    result["achieved_gflops"] = round(flops / seconds / 1e9, 1)
    result["peak_gflops"] = round(peak, 1)
    result["peak_shapes"] = shapes
    result["fraction_of_peak"] = round(flops / seconds / 1e9 / peak, 3)
    result["epoch_predictions"] = windows.predictions
    result["epoch_estimate_s"] = round(windows.predictions / predictions_per_s)
    result["epoch_minutes_estimate"] = round(windows.predictions / predictions_per_s / 60, 1)
    result["ratio"] = round(predictions_per_s / result["per_prompt_predictions_per_s"], 2)
    print(
        f"sequence objective: {predictions_per_s:.1f} predictions/s, {flops / seconds / 1e9:.0f} GFLOP/s of a "
        f"{peak:.0f} GFLOP/s {result['dtype']} matmul peak ({result['fraction_of_peak']:.0%}); epoch of "
        f"{windows.predictions} predictions ~{result['epoch_estimate_s']} s",
        flush=True,
    )
    result.update(evaluation_speed(args, model, config, overrides))
    if args.levers:  # last: it leaves the layers compiled
        result.update(levers(model, trainer, timed, warm, predictions_per_s))
    return result


def formats(args, overrides: dict, out: str) -> dict:
    """The sequence objective's training speed with titles and with ``args.item_id_format`` on the
    same seeded windows of ml-100k's epoch, in one run (best of 3 timed passes after a warm-up step
    each): predictions per second, an epoch's estimate, tokens per prediction, and the ratio."""
    from recbole_llmgen import sequence

    result = {"windows": args.windows, "max_history_items": args.history}
    sample = None
    for fmt in ("title", args.item_id_format):
        config, train_data, model, trainer = lora_run(
            out, overrides, prompt_format="list", llm_train_objective="sequence", max_history_items=args.history,
            item_text_template="{movie_title}", lora_r=16, lora_alpha=32, train_batch_size=8,
            llm_train_batch_size=8, item_id_format=fmt,
        )  # fmt: skip
        windows = sequence.window_loader(train_data, model, config["train_batch_size"], int(config["seed"]))
        if sample is None:
            rng = np.random.default_rng(0)
            sample = [windows.items[i] for i in rng.choice(len(windows.items), size=2 * args.windows, replace=False)]
        lengths = [model.prompts.list_length(w) for w in sample]
        warm = sequence.WindowLoader(train_data._dataset, sample[args.windows :][:8], lengths[args.windows :][:8], 8, 0)
        timed = sequence.WindowLoader(train_data._dataset, sample[: args.windows], lengths[: args.windows], 8, 0)
        trainer._train_epoch(warm, 0)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            trainer._train_epoch(timed, 1)
            best = min(best, time.perf_counter() - start)
        if fmt == "token":  # the header, then one position per item but the last
            tokens = sum(len(model.prompts.list_head) + len(w) - 1 for w in timed.items)
        else:
            tokens = sum(len(r) for r in model.prompts.window_rows(timed.items)[0])
        rate = timed.predictions / best
        result[f"{fmt}_predictions_per_s"] = round(rate, 2)
        result[f"{fmt}_tokens_per_prediction"] = round(tokens / timed.predictions, 2)
        result[f"{fmt}_epoch_estimate_s"] = round(windows.predictions / rate)
        print(f"{fmt}: {rate:.1f} predictions/s, {tokens / timed.predictions:.1f} tokens per prediction", flush=True)
    fmt = args.item_id_format
    result["item_id_format"] = fmt
    result["predictions_per_s"] = result[f"{fmt}_predictions_per_s"]
    result["epoch_estimate_s"] = result[f"{fmt}_epoch_estimate_s"]
    result["tokens_per_prediction"] = result[f"{fmt}_tokens_per_prediction"]
    result["speedup_vs_title"] = round(result[f"{fmt}_predictions_per_s"] / result["title_predictions_per_s"], 2)
    return result


def training_flops(llm, rows, predicted_tokens: int) -> int:
    """Useful FLOPs of one LoRA training pass over ``rows``: every frozen linear layer forward and
    back to its input (4 x weights per token), the adapters (forward, input and weight gradients:
    6 x their weights per token), the output layer at the predicted tokens (logits and the
    gradient of the hidden state: 4 x its weights), attention over each row's own keys (QK and PV,
    forward and backward: 12 x layers x hidden x T^2, the full square the kernels compute)."""
    config = llm.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    output = llm.get_output_embeddings()
    frozen = sum(
        m.weight.numel()
        for m in llm.modules()
        if isinstance(m, torch.nn.Linear) and m is not output and not m.weight.requires_grad
    )
    adapters = sum(p.numel() for p in llm.parameters() if p.requires_grad)
    tokens = sum(len(r) for r in rows)
    attention = sum(12 * layers * hidden * len(r) ** 2 for r in rows)
    return 4 * frozen * tokens + 6 * adapters * tokens + 4 * output.weight.numel() * predicted_tokens + attention


def levers(model, trainer, timed, warm, fused_eager: float) -> dict:
    """Each training lever alone on the same windows, interleaved (round after round, each setting
    once per round; the median per setting), so a noisy machine slows all of them alike: the
    library's logits + log-softmax against the fused chunked loss, SDPA against eager attention;
    then ``torch.compile`` of the decoder layers on top (its compile time reported)."""
    import contextlib
    import statistics

    from recbole_llmgen import finetune, llm
    from recbole_llmgen import trainer as trainer_module

    fused_layer, eager = finetune.fused_output_layer, llm.training_attention
    settings = {
        "lever_library_loss_sdpa_attention": (lambda _llm: None, lambda _llm: contextlib.nullcontext()),  # before
        "lever_library_loss_eager_attention": (lambda _llm: None, eager),
        "lever_fused_loss_sdpa_attention": (fused_layer, lambda _llm: contextlib.nullcontext()),
        "lever_fused_loss_eager_attention": (fused_layer, eager),  # this version
    }
    rates: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(3):
        for name, (layer, attention) in settings.items():
            finetune.fused_output_layer, trainer_module.training_attention = layer, attention
            start = time.perf_counter()
            trainer._train_epoch(timed, 1)
            rates[name].append(timed.predictions / (time.perf_counter() - start))
    finetune.fused_output_layer, trainer_module.training_attention = fused_layer, eager
    found = {name: round(statistics.median(r), 2) for name, r in rates.items()}
    found["lever_speedup_vs_before"] = round(
        found["lever_fused_loss_eager_attention"] / found["lever_library_loss_sdpa_attention"], 2
    )
    start = time.perf_counter()
    for layer in model.llm.get_decoder().layers:
        layer.compile(dynamic=True)  # window lengths vary: dynamic shapes instead of one graph per length
    trainer._train_epoch(warm, 0)
    found["compile_first_step_s"] = round(time.perf_counter() - start, 1)
    compiled = []
    for _ in range(3):
        start = time.perf_counter()
        trainer._train_epoch(timed, 1)
        compiled.append(timed.predictions / (time.perf_counter() - start))
    found["lever_compiled_layers"] = round(statistics.median(compiled), 2)
    print("levers (predictions/s, median of 3 interleaved rounds):", found, flush=True)
    return found


def evaluation_speed(args, model, config, overrides) -> dict:
    """Users/s of evaluating a sample of test users (likelihood over 20 candidates): the base model,
    the LoRA model with its adapters unmerged, and merged (what evaluation does since issue 25)."""
    from _harness import prepare, sample_users, timed_evaluate

    from recbole_llmgen.integration import build_model
    from recbole_llmgen.trainer import LLMGenTrainer

    if not args.eval_users:
        return {}
    base_config, base_train, _, test_data = prepare(
        "LLMGen", "ml-100k", {**model_settings(config), "train_mode": "none", **overrides}
    )
    base = build_model(base_config, base_train)
    test, warm = sample_users(test_data, args.eval_users, 2024), sample_users(test_data, 4, 7)
    with torch.no_grad():
        for p in model.llm_trainable.values():  # adapters that move every weight (a trained model's cost)
            p.add_(0.01 * torch.randn_like(p))
    found, scores = {}, {}
    for name, evaluated in (("base", base), ("unmerged", model), ("merged", model)):
        evaluated.train()
        adapters = evaluated.adapters
        if name == "unmerged":
            evaluated.adapters = None  # evaluation mode without the merge
        trainer = LLMGenTrainer(config, evaluated)
        timed_evaluate(trainer, warm, config)  # warm-up
        metrics, seconds = timed_evaluate(trainer, test, config)
        evaluated.adapters = adapters
        found[f"eval_users_per_s_{name}"] = round(args.eval_users / seconds, 3)
        scores[name] = metrics
    found["eval_merged_vs_base_time"] = round(found["eval_users_per_s_base"] / found["eval_users_per_s_merged"], 2)
    found["eval_unmerged_vs_merged_time"] = round(
        found["eval_users_per_s_merged"] / found["eval_users_per_s_unmerged"], 2
    )
    found["eval_metrics_max_abs_diff_merged_unmerged"] = max(
        abs(scores["merged"][k] - scores["unmerged"][k]) for k in scores["merged"]
    )  # bf16 rounding of the merged weights may swap near-tied candidates
    print(
        f"evaluation of {args.eval_users} test users: base {found['eval_users_per_s_base']}/s, LoRA unmerged "
        f"{found['eval_users_per_s_unmerged']}/s, merged {found['eval_users_per_s_merged']}/s "
        f"(metrics merged {scores['merged']}, unmerged {scores['unmerged']})",
        flush=True,
    )
    return found


def model_settings(config) -> dict:
    keys = ("prompt_format", "llm_train_objective", "max_history_items", "item_text_template", "train_batch_size")
    return {k: config[k] for k in keys}


if __name__ == "__main__":
    main()
