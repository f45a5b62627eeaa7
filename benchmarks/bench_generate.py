"""Direct generation vs likelihood reranking on the ml-100k test split (full ranking).

    python benchmarks/bench_generate.py [--users N] [--methods generate,likelihood] [--key=value ...]

Evaluates through RecBole's Trainer.evaluate (test split only). For generate it also checks that
every generated item is a real catalogue item not in the user's prompt history (invalid_items
must be 0). The last line is one JSON object with users_per_s, ndcg@10, hit@10, invalid_items.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="generate,likelihood")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--users", type=int, default=0, help="evaluate only the first N test users (0 = all)")
    args, rest = parser.parse_known_args()
    sys.argv = sys.argv[:1]

    from _harness import method_runs
    from recbole.utils import get_trainer

    import recbole_llmgen
    from recbole_llmgen.cli import parse_overrides

    overrides = parse_overrides(rest)
    results = {}
    for method, config, train_data, test_data in method_runs(args.methods, args.dataset, overrides, "bench_generate-"):
        model = recbole_llmgen.LLMGen(config, train_data._dataset)
        invalid = generated = 0
        if method == "generate":
            original = model.generator.items

            def checked(histories, _original=original, _n_items=model.n_items):
                nonlocal invalid, generated
                found = _original(histories)
                for history, pairs in zip(histories, found):
                    generated += len(pairs)
                    invalid += sum(1 for i, _ in pairs if not (0 < i < _n_items) or i in history)
                return found

            model.generator.items = checked
        if args.users:
            limit = args.users
            batches = []
            for batch in test_data:
                batches.append(batch)
                if sum(len(b[0]) for b in batches) >= limit:
                    break
            test_data = first_batches(test_data, batches)
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        trainer.eval_collector.data_collect(train_data)
        start = time.perf_counter()
        result = trainer.evaluate(test_data, load_best_model=False, show_progress=config["show_progress"])
        seconds = time.perf_counter() - start
        users = sum(len(b[0]) for b in test_data)
        results[method] = {
            "seconds": round(seconds, 1),
            "users": users,
            "users_per_s": round(users / seconds, 3),
            "ndcg@10": round(float(result["ndcg@10"]), 4),
            "hit@10": round(float(result["hit@10"]), 4),
        }
        if method == "generate":
            results[method]["generated_items"] = generated
            results[method]["invalid_items"] = invalid
        print(method, results[method], flush=True)
    headline = results.get("generate", next(iter(results.values())))
    print(json.dumps({**{k: headline[k] for k in ("users_per_s", "ndcg@10", "hit@10")},
                      "invalid_items": headline.get("invalid_items", 0), "results": results}))  # fmt: skip


def first_batches(loader, batches):
    """A copy of ``loader`` that yields only ``batches`` (still a FullSortEvalDataLoader to RecBole)."""
    subset = copy.copy(loader)
    subset.__class__ = type(
        "FirstBatches", (type(loader),), {"__iter__": lambda self: iter(batches), "__len__": lambda self: len(batches)}
    )
    return subset


if __name__ == "__main__":
    main()
