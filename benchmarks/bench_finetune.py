"""LLMGen before and after LoRA fine-tuning, next to Pop and SASRec, on one ml-100k split.

    python benchmarks/bench_finetune.py [--eval-users 300] [--examples-per-user 1] [--epochs 1]
                                        [--sasrec-epochs 5] [--key=value ...]

Everything runs through RecBole: the same LS split and seed for every model, RecBole's trainers,
RecBole's evaluator. Test metrics (NDCG@10, Hit@10) on full ranking and on uni19 (the target plus
19 sampled items) for the same seeded sample of ``--eval-users`` test users (0 = all 943), with
the sampled negatives reset to the same seed for every model. LLMGen validates on a sample of
the same size of valid users after each epoch; SASRec on every valid user.

CPU budget on 2 cores, measured with ``--sasrec-epochs 5``: 48 minutes (SASRec ~2 min per epoch;
LoRA training 13 min on each user's most recent training example, 943 examples; its validation on
300 users 5 min; four LLM test evaluations of 300 users ~4.5 min each).
``--key=value`` arguments go to every model's config. The last line is one JSON object
with zero_shot_ndcg@10, finetuned_ndcg@10, sasrec_ndcg@10, train_seconds (full ranking).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--eval-users", type=int, default=300, help="test users to evaluate (seeded sample; 0 = all)")
    parser.add_argument("--examples-per-user", type=int, default=1, help="llm_train_examples_per_user")
    parser.add_argument("--epochs", type=int, default=1, help="LoRA epochs")
    parser.add_argument("--sasrec-epochs", type=int, default=5, help="~2 min per epoch on 2 cores")
    args, rest = parser.parse_known_args()
    sys.argv = sys.argv[:1]

    from _harness import prepare, sample_users, timed_evaluate, users_in
    from recbole.utils import get_trainer

    from recbole_llmgen.cli import parse_overrides
    from recbole_llmgen.integration import build_model, load_checkpoint

    overrides = parse_overrides(rest)
    out = tempfile.mkdtemp(prefix="bench_finetune-")
    # --key=value goes to every model's config (RecBole ignores LLMGen's keys for the others)
    common = {"checkpoint_dir": os.path.join(out, "saved"), "show_progress": False, **overrides}
    protocols = {"full": "full", "uni19": "uni19"}
    rows: dict[str, dict] = {}

    def run(name: str, model: str, config_dict: dict, train: bool, valid_users: int | None) -> None:
        """Train (optionally) on the full-ranking split, then evaluate on both protocols."""
        row = {}
        loaders = {}
        for protocol, mode in protocols.items():
            cfg = {
                **common,
                **config_dict,
                "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": mode},
            }
            config, train_data, valid_data, test_data = prepare(model, args.dataset, cfg)
            loaders[protocol] = (
                config,
                train_data,
                valid_data,
                sample_users(test_data, args.eval_users, config["seed"]),
            )
        config, train_data, valid_data, _ = loaders["full"]
        start = time.perf_counter()
        model_obj = build_model(config, train_data)
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model_obj)
        row["load_seconds"] = round(time.perf_counter() - start, 1)
        train_time = [0.0]
        epoch = trainer._train_epoch

        def timed_epoch(*a, **kw):
            begin = time.perf_counter()
            try:
                return epoch(*a, **kw)
            finally:
                train_time[0] += time.perf_counter() - begin

        trainer._train_epoch = timed_epoch
        start = time.perf_counter()
        if train:
            valid = sample_users(valid_data, valid_users, config["seed"]) if valid_users is not None else valid_data
            trainer.fit(train_data, valid, saved=True, show_progress=False)
            if os.path.isfile(trainer.saved_model_file):  # test the best epoch's weights
                state = load_checkpoint(trainer.saved_model_file, map_location=trainer.device)  # this run's own
                model_obj.load_state_dict(state["state_dict"])
                model_obj.load_other_parameter(state.get("other_parameter"))
        else:
            trainer.eval_collector.data_collect(train_data)
        row["fit_seconds"] = round(time.perf_counter() - start, 1)  # training + validation
        row["train_seconds"] = round(train_time[0], 1)  # training epochs only
        for protocol, (cfg, _, _, test_data) in loaders.items():
            result, seconds = timed_evaluate(trainer, test_data, cfg)
            row[f"{protocol}_ndcg@10"] = result["ndcg@10"]
            row[f"{protocol}_hit@10"] = result["hit@10"]
            row[f"{protocol}_eval_seconds"] = seconds
        row["test_users"] = users_in(loaders["full"][3])
        row["trainable_parameters"] = sum(p.numel() for p in model_obj.parameters() if p.requires_grad)
        rows[name] = row
        print(name, row, flush=True)

    run("Pop", "Pop", {}, train=True, valid_users=None)
    run(
        "SASRec",
        "SASRec",
        {"train_neg_sample_args": None, "epochs": args.sasrec_epochs, "stopping_step": 3},
        True,
        None,
    )
    llm = {"llm_train_examples_per_user": args.examples_per_user}
    run("LLMGen zero-shot", "LLMGen", {**llm, "train_mode": "none"}, train=False, valid_users=None)
    run("LLMGen LoRA", "LLMGen", {**llm, "train_mode": "lora", "epochs": args.epochs}, True, args.eval_users)

    print("\n| model | full NDCG@10 | full Hit@10 | uni19 NDCG@10 | uni19 Hit@10 | train s | eval s (full) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['full_ndcg@10']:.4f} | {r['full_hit@10']:.4f} | {r['uni19_ndcg@10']:.4f} | "
            f"{r['uni19_hit@10']:.4f} | {r['train_seconds']} | {r['full_eval_seconds']} |"
        )
    summary = {
        "zero_shot_ndcg@10": rows["LLMGen zero-shot"]["full_ndcg@10"],
        "finetuned_ndcg@10": rows["LLMGen LoRA"]["full_ndcg@10"],
        "sasrec_ndcg@10": rows["SASRec"]["full_ndcg@10"],
        "pop_ndcg@10": rows["Pop"]["full_ndcg@10"],
        "zero_shot_uni19_ndcg@10": rows["LLMGen zero-shot"]["uni19_ndcg@10"],
        "finetuned_uni19_ndcg@10": rows["LLMGen LoRA"]["uni19_ndcg@10"],
        "sasrec_uni19_ndcg@10": rows["SASRec"]["uni19_ndcg@10"],
        "train_seconds": rows["LLMGen LoRA"]["train_seconds"],
        "test_users": rows["LLMGen LoRA"]["test_users"],
        "examples_per_user": args.examples_per_user,
        "epochs": args.epochs,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
