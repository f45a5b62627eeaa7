"""Zero-shot LLMGen on the whole ml-100k test split (943 users), full ranking, K candidates.

Evaluates the test split only (RecBole's LS split, the same one Pop's 0.0354 NDCG@10 comes from),
once per score method, through RecBole's own Trainer.evaluate. Run on an idle machine:
    python benchmarks/bench_zero_shot.py [--methods likelihood,verbalizer] [--users N] [--key=value ...]
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="likelihood,verbalizer")
    parser.add_argument("--dataset", default="ml-100k")
    args, rest = parser.parse_known_args()
    sys.argv = sys.argv[:1]

    from _harness import method_runs, timed_evaluate, users_in
    from recbole.utils import get_trainer

    import recbole_llmgen
    from recbole_llmgen.cli import parse_overrides

    overrides = parse_overrides(rest)
    results = {}
    for method, config, train_data, test_data in method_runs(args.methods, args.dataset, overrides, "bench_zero_shot-"):
        start = time.perf_counter()
        model = recbole_llmgen.LLMGen(config, train_data._dataset)
        load_s = time.perf_counter() - start
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        trainer.eval_collector.data_collect(train_data)
        result, seconds = timed_evaluate(trainer, test_data, config, show_progress=config["show_progress"])
        results[method] = {
            "eval_seconds": seconds,
            "model_load_seconds": round(load_s, 1),
            "users": users_in(test_data),
            **result,
        }
        print(method, results[method], flush=True)
    print(json.dumps({"dataset": args.dataset, "num_candidates": config["num_candidates"], "results": results}))


if __name__ == "__main__":
    main()
