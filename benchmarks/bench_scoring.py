"""Shared-prefix scoring vs naive per-candidate passes vs the verbalizer, in one run.

Real ml-100k prompts (last 10 titles of test users), K=20 popularity candidates, the bundled
SmolLM2-135M-Instruct. Run on an idle machine: python benchmarks/bench_scoring.py [--users 30]
The last line is one JSON object.
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
    parser.add_argument("--users", type=int, default=30)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--llm_path", default="bundled:smollm2")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv

    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    import recbole_llmgen  # noqa: F401  (registers LLMGen)
    from recbole_llmgen import scoring

    out = tempfile.mkdtemp(prefix="bench_scoring-")
    config = Config(
        model="LLMGen",
        dataset="ml-100k",
        config_dict={
            "llm_path": args.llm_path,
            "num_candidates": args.candidates,
            "checkpoint_dir": os.path.join(out, "saved"),
            "show_progress": False,
        },
    )
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, _, test_data = data_preparation(config, dataset)
    model = recbole_llmgen.LLMGen(config, train_data._dataset)
    torch.set_grad_enabled(False)

    # real prompts and candidates of the first test users
    batch = next(iter(test_data))[0]
    seqs, lens = batch[model.ITEM_SEQ][: args.users], batch[model.ITEM_SEQ_LEN][: args.users]
    retrieval = model.retrieval_scores(seqs, lens)
    from recbole_llmgen.candidates import top_candidates

    candidates = top_candidates(retrieval, args.candidates).tolist()
    histories = [seqs[b, : lens[b]].tolist() for b in range(len(seqs))]
    prompts = [model.build_prompt(h, c) for h, c in zip(histories, candidates)]
    conts = [[model.item_token_ids[i] for i in c] for c in candidates]
    n = len(prompts)
    print(
        f"{n} users, K={args.candidates}, mean prompt {sum(map(len, prompts)) / n:.0f} tokens, "
        f"mean item text {sum(len(t) for c in conts for t in c) / (n * args.candidates):.1f} tokens, "
        f"threads={torch.get_num_threads()}"
    )

    scoring.shared_prefix_scores(model.llm, prompts[0], conts[0])  # warm-up

    start = time.perf_counter()
    naive = [scoring.naive_scores(model.llm, p, c) for p, c in zip(prompts, conts)]
    naive_s = time.perf_counter() - start

    start = time.perf_counter()
    common = model.shared_prefix()  # the prompt head every user shares, computed once
    shared = [
        scoring.shared_prefix_scores(model.llm, p, c, model.llm_score_batch_size, shared=common)
        for p, c in zip(prompts, conts)
    ]
    shared_s = time.perf_counter() - start

    model.score_method = "verbalizer"
    model.label_token_ids = model._label_token_ids()
    start = time.perf_counter()
    for h, c in zip(histories, candidates):
        model.score_candidates(h, c)
    verbalizer_s = time.perf_counter() - start

    diff = max((a - b).abs().max().item() for a, b in zip(naive, shared))
    result = {
        "users": n,
        "candidates": args.candidates,
        "naive_seconds": round(naive_s, 3),
        "shared_seconds": round(shared_s, 3),
        "verbalizer_seconds": round(verbalizer_s, 3),
        "naive_users_per_s": round(n / naive_s, 3),
        "shared_users_per_s": round(n / shared_s, 3),
        "verbalizer_users_per_s": round(n / verbalizer_s, 3),
        "speedup_shared_vs_naive": round(naive_s / shared_s, 2),
        "max_abs_diff": diff,
    }
    print(f"naive {naive_s:.2f}s | shared prefix {shared_s:.2f}s | verbalizer {verbalizer_s:.2f}s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
