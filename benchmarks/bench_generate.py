"""Direct generation from the whole catalogue: speed, validity and what bounds its quality.

    python benchmarks/bench_generate.py [--users N] [--previous-users M] [--model-file saved/LLMGen-....pth] [--key=value ...]

LLMGen with ``score_method: generate``, ``candidate_source: none`` (no classic model: the generated
items, then every other unseen item by training popularity), 20 beams and 20 history titles in
the format ``configs/llmgen_ml-100k_generate.yaml`` uses (``prompt_format: list``, titles only) by
default, evaluated through RecBole's Trainer.evaluate on a seeded sample of N ml-100k test users
(0 = all 943). It checks every generated item: ``invalid_items`` (not a catalogue item) and
``seen_items`` (an item the user already has) must both be 0. ``beam_recall`` is the share of users
whose test item is among their generated items: no ranking of the beams can do better than that.
``speedup_vs_previous`` times the search this version replaced (one KV-cache row per beam,
reordered every step, a [rows, vocabulary] copy to the host per step; kept below as
``previous_search``) against the present one on the same M users' prompts, same run.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--users", type=int, default=0, help="a seeded sample of N test users (0 = all)")
    parser.add_argument("--previous-users", type=int, default=24, help="users for the speed-up against the old search")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--model-file", default=None, help="a fine-tuned LLMGen checkpoint (its own settings)")
    args, rest = parser.parse_known_args()
    sys.argv = sys.argv[:1]

    from _harness import method_runs, sample_users, timed_evaluate, users_in
    from recbole.utils import get_trainer

    import recbole_llmgen
    from recbole_llmgen.cli import parse_overrides
    from recbole_llmgen.decoder import allocator_keeps_memory
    from recbole_llmgen.generation import batched_constrained_beam_search

    overrides = {
        "candidate_source": "none",
        "num_beams": 20,
        "max_history_items": 20,
        # the format configs/llmgen_ml-100k_generate.yaml trains and generates in (--prompt_format=chat ... for the default)
        "prompt_format": "list",
        "item_text_template": "{movie_title}",
        **parse_overrides(rest),
    }
    if args.model_file:  # the checkpoint's config and trained weights (its split, its settings)
        from recbole.quick_start import load_data_and_model

        config, model, _, train_data, _, test_data = load_data_and_model(args.model_file)
    else:
        ((_, config, train_data, test_data),) = method_runs("generate", args.dataset, overrides, "bench_generate-")
        model = recbole_llmgen.LLMGen(config, train_data._dataset)
    test_data = sample_users(test_data, args.users, args.seed)
    checked = {"generated": 0, "invalid": 0, "seen": 0, "users": 0, "recalled": 0}
    full_sort, items = model.full_sort_predict, model.generator.items
    targets: list[list[int]] = []

    def full_sort_predict(interaction):
        targets.append(interaction[model.ITEM_ID].cpu().tolist())
        return full_sort(interaction)

    def generated(histories, requests=None, seen=None):
        found = items(histories, requests, seen)
        for pairs, blocked, target in zip(found, seen or histories, targets[-1]):
            ids = {i for i, _ in pairs}
            checked["generated"] += len(pairs)
            checked["invalid"] += sum(1 for i in ids if not 0 < i < model.n_items)
            checked["seen"] += len(ids & set(blocked))
            checked["users"] += 1
            checked["recalled"] += int(target in ids)
        return found

    model.full_sort_predict, model.generator.items = full_sort_predict, generated
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.eval_collector.data_collect(train_data)
    result, seconds = timed_evaluate(trainer, test_data, config, show_progress=config["show_progress"])
    users = users_in(test_data)
    counts = model.generator.counts
    print(f"generate: {users} users in {seconds} s, {result}", flush=True)

    # the previous search against the present one on the same prompts
    model.full_sort_predict, model.generator.items = full_sort, items
    histories, seen = [], []
    for batch in test_data:
        view = model.retriever.view(batch[0])
        histories += view.histories
        seen += view.seen
        if len(histories) >= args.previous_users:
            break
    histories, seen = histories[: args.previous_users], seen[: args.previous_users]
    longest = model.prompts.longest_item
    prompts = [model.prompts.build(h, reserve_tokens=longest) for h in histories]
    trie, beams, pad, step = model.generator.trie(), config["num_beams"], model.tokenizer.pad_token_id, 8
    start = time.perf_counter()
    for i in range(0, len(prompts), step):
        previous_search(model.llm, prompts[i : i + step], trie, beams, pad)
    previous_s = time.perf_counter() - start
    per_batch, pool = config["generation_users_per_batch"], {}
    start = time.perf_counter()
    with allocator_keeps_memory():  # as the Generator runs its batches
        for i in range(0, len(prompts), per_batch):
            batched_constrained_beam_search(model.llm, prompts[i : i + per_batch], trie, beams, pad,
                                            seen=seen[i : i + per_batch], shared=model.scorer.shared_prefix(),
                                            pool=pool)  # fmt: skip
    present_s = time.perf_counter() - start
    print(f"previous search: {len(prompts)} users in {previous_s:.1f} s; present: {present_s:.1f} s", flush=True)
    print(
        json.dumps(
            {
                "model_file": args.model_file,
                "users": users,
                "eval_seconds": seconds,
                "users_per_s": round(users / seconds, 3),
                "num_beams": beams,
                "max_history_items": config["max_history_items"],
                "generation_users_per_batch": per_batch,
                "dtype": str(model.llm.dtype).removeprefix("torch."),
                "tokens_per_user": round((counts.get("prompt_tokens", 0) + counts.get("beam_tokens", 0)) / users, 1),
                "prompt_tokens_per_user": round(counts.get("prompt_tokens", 0) / users, 1),
                "beam_tokens_per_user": round(counts.get("beam_tokens", 0) / users, 1),
                "generated_per_user": round(checked["generated"] / max(1, checked["users"]), 1),
                "invalid_items": checked["invalid"],
                "seen_items": checked["seen"],
                "beam_recall": round(checked["recalled"] / max(1, checked["users"]), 4),
                "speedup_vs_previous": round(previous_s / present_s, 2),
                "previous_users_per_s": round(len(prompts) / previous_s, 3),
                "present_users_per_s_same_users": round(len(prompts) / present_s, 3),
                **result,
            }
        )
    )


@torch.no_grad()
def previous_search(
    model, prompts: Sequence[Sequence[int]], trie, num_beams: int, pad_token_id: int = 0
) -> list[list[tuple[int, float]]]:
    """The search this version replaced, verbatim in what it computes: left-padded prompts, one
    KV-cache row per beam reordered every step, the [rows, vocabulary] log-probabilities copied to
    the host every step, seen items filtered only afterwards."""
    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=True, logits_to_keep=1)  # fmt: skip
    cache = out.cache
    next_logprobs = F.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()
    beams = [(user, 0, 0.0, 0) for user in range(len(prompts))]
    finished: list[dict[int, float]] = [{} for _ in prompts]
    step = 0
    while beams:
        per_user: dict[int, list] = {}
        for row, (user, node, total, length) in enumerate(beams):
            tokens = list(trie.children[node])
            values = next_logprobs[row, tokens].tolist() if tokens else []
            for token, value in zip(tokens, values):
                per_user.setdefault(user, []).append(
                    (total + value, row, token, trie.children[node][token], length + 1)
                )
        live = []
        for user in sorted(per_user):
            for total, row, token, child, length in sorted(per_user[user], key=lambda e: (-e[0], e[1], e[2]))[
                :num_beams
            ]:
                for item in trie.items[child]:
                    finished[user][item] = total / length
                if trie.children[child]:
                    live.append((user, child, total, length, row, token))
        if not live:
            break
        step += 1
        cache.batch_select_indices(torch.tensor([row for *_, row, _ in live], device=device))
        users = [user for user, *_ in live]
        step_mask = torch.cat([mask[users], torch.ones(len(live), step, dtype=torch.long)], dim=1)
        step_positions = torch.tensor([[len(prompts[u]) + step - 1] for u in users])
        logits = model(input_ids=torch.tensor([[token] for *_, token in live], device=device),
                       attention_mask=step_mask.to(device), position_ids=step_positions.to(device), cache=cache,
                       use_cache=True).logits[:, -1]  # fmt: skip
        next_logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
        beams = [(user, child, total, length) for user, child, total, length, _, _ in live]
    return [sorted(f.items(), key=lambda kv: (-kv[1], kv[0])) for f in finished]


if __name__ == "__main__":
    main()
