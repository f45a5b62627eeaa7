"""The order of the generated items: ``length_penalty`` chosen on the valid split, one search a split.

    python benchmarks/bench_length_penalty.py [--stride 80] [--penalties 1,0.75,0.5,0.25,0] [--users 0] [--out DIR]

Fine-tunes ``configs/llmgen_ml-100k_generate.yaml`` for one epoch over windows every ``--stride``
items (80: a quarter of every training interaction; skipped when DIR/saved holds its checkpoint),
then generates 20 beams for the valid and the test users (``--users``: a seeded sample, 0 = all).
Beams are pruned by the summed log-probability whatever ``length_penalty`` is, so one search per
split is ranked by every value (summed log-prob / tokens ** value) and evaluated by RecBole's
evaluator. The value with the best valid NDCG@10 is the choice; test numbers are reported for every
value, never used to choose, and DIR/LLMGen-lp<value>.users.csv keep each one's per-user test
metrics for ``recbole-llmgen compare``. One JSON line per (split, value), then the choice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stride", type=int, default=80, help="llm_train_window_stride of the one epoch")
    parser.add_argument("--penalties", default="1,0.75,0.5,0.25,0")
    parser.add_argument("--users", type=int, default=0, help="a seeded sample of N users per split (0 = all)")
    parser.add_argument("--out", default="results/bench-length-penalty")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from sys.argv
    sys.path.insert(0, str(HERE))
    from _harness import prepare, sample_users
    from recbole.utils import init_seed

    from recbole_llmgen import per_user
    from recbole_llmgen.benchmark import keep_struct
    from recbole_llmgen.integration import build_model, load_checkpoint
    from recbole_llmgen.trainer import LLMGenTrainer

    out = Path(args.out).resolve()
    settings = yaml.safe_load((HERE.parent / "configs" / "llmgen_ml-100k_generate.yaml").read_text())["LLMGen"]
    settings.update(llm_train_window_stride=args.stride, epochs=1, stopping_step=0, length_penalty="auto", seed=2020,
                    checkpoint_dir=str(out / "saved"), show_progress=False, topk=[10, 20])  # fmt: skip
    config, train, valid, test = prepare("LLMGen", "ml-100k", settings)
    init_seed(config["seed"], config["reproducibility"])
    model = build_model(config, train)
    trainer = LLMGenTrainer(config, model)
    saved = sorted((out / "saved").glob("LLMGen-*.pth")) if (out / "saved").is_dir() else []
    if not saved:
        start = time.perf_counter()
        trainer.fit(train, None, saved=True, show_progress=False)
        print(json.dumps({"train_s": round(time.perf_counter() - start, 1), "stride": args.stride}), flush=True)
        saved = [Path(trainer.saved_model_file)]
    checkpoint = load_checkpoint(str(saved[-1]))  # the checkpoint this script trained (a pickle)
    model.load_state_dict(checkpoint["state_dict"], strict=False)
    model.load_other_parameter(checkpoint.get("other_parameter"))
    model.generator.weights_changed()

    values = [float(v) for v in args.penalties.split(",")]
    valid_scores = {}
    for split, loader in (("valid", valid), ("test", test)):
        loader = sample_users(loader, args.users, config["seed"])
        with model.cached():  # one search per user; every value re-ranks it
            for value in values:
                model.length_penalty = value  # the generator keeps summed log-probs: every value re-ranks them
                init_seed(config["seed"], config["reproducibility"])
                start = time.perf_counter()
                with keep_struct(trainer) as kept:
                    result = trainer.evaluate(loader, load_best_model=False, show_progress=False)
                row = {"split": split, "length_penalty": value, "seconds": round(time.perf_counter() - start, 1),
                       **{k: round(float(v), 4) for k, v in result.items()}}  # fmt: skip
                print(json.dumps(row), flush=True)
                if split == "valid":
                    valid_scores[value] = row["ndcg@10"]
                else:
                    metrics = per_user.per_user_values(kept["struct"], trainer.evaluator, config["topk"])
                    users, targets = per_user.users_in_order(loader)
                    per_user.write_users(str(out / f"LLMGen-lp{value:g}.users.csv"), users, "test", metrics, targets)
    best = max(valid_scores, key=lambda v: (valid_scores[v], v))  # a tie goes to the larger value (the mean's side)
    print(
        json.dumps({"chosen_on_valid": best, "valid_ndcg@10": valid_scores, "users": args.users or "all"}), flush=True
    )


if __name__ == "__main__":
    main()
