"""One training step of a RecBole classic model, fp32 against RecBole's own ``enable_amp`` (autocast:
bf16 on a CPU), in one run; ``--profile`` adds torch.profiler's table of the fp32 step's kernels.

The model is built exactly as the benchmark builds it (:func:`recbole_llmgen.benchmark.model_config`:
its defaults, the leave-one-out split, the ``seen_items`` rule); the steps are RecBole's
``calculate_loss``, backward and an Adam step on the epoch's own batches, after two warm-up steps.
The last line is one JSON object: seconds a step per dtype, the epoch estimate (steps x seconds),
``amp_speedup`` (fp32 / amp) and the machine.

    python benchmarks/bench_classic_step.py [--model SASRec] [--steps 6] [--profile] [--key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

sys.argv, ARGS = sys.argv[:1], sys.argv[1:]  # RecBole reads --key=value from sys.argv

import torch  # noqa: E402

from recbole_llmgen import benchmark  # noqa: E402
from recbole_llmgen.cli import parse_overrides  # noqa: E402
from recbole_llmgen.integration import build_config, build_model, load_data, recbole_argv  # noqa: E402
from recbole_llmgen.llm import describe_machine  # noqa: E402


def seconds_a_step(model, batches, steps: int, amp: bool) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):  # as RecBole's Trainer with enable_amp
            loss = model.calculate_loss(next(batches))
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SASRec")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--profile", action="store_true")
    args, rest = parser.parse_known_args(ARGS)
    overrides = parse_overrides(rest)
    config_dict = benchmark.model_config(args.model, args.dataset, "full", overrides, "bench_out/classic-step")
    config_dict.pop("enable_amp", None)  # both dtypes are timed here
    with recbole_argv([]):
        config = build_config(args.model, args.dataset, config_dict)
    train_data, _, _ = load_data(config)
    result = {"model": args.model, "batch": config["train_batch_size"], "steps_per_epoch": len(train_data)}
    for name, amp in (("fp32", False), ("amp", True)):
        model = build_model(config, train_data)
        model.train()
        batches = iter(train_data)
        result[f"{name}_s_per_step"] = round(seconds_a_step(model, batches, args.steps, amp), 3)
        result[f"{name}_epoch_estimate_s"] = round(result[f"{name}_s_per_step"] * len(train_data), 1)
    result["amp_speedup"] = round(result["fp32_s_per_step"] / result["amp_s_per_step"], 2)
    result["machine"] = describe_machine("cpu")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        model = build_model(config, train_data)
        model.train()
        batches = iter(train_data)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            seconds_a_step(model, batches, 2, amp=False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
