"""The request protocol of the benchmark (``recbole-llmgen benchmark --requests``).

Each evaluated user asks for something in words built from the *target's* genre (a ``class``-like
token_seq field of the .item file): one of the target's genres, drawn with a seeded generator per
user, put into one of :data:`TEMPLATES` ("I feel like watching a comedy."). The target item itself
never appears in the request or the prompt. Rows, all on the same users and targets:

- the best classic model's ranking (no request), and the same ranking restricted to items that
  have the requested genre (the honest classic answer to a genre request);
- LLMGen without the request (its usual full ranking), with the request (request_weight chosen on
  the valid split from :data:`WEIGHTS`, by NDCG@10), and the request retriever alone (weight 1).

Metrics per user: NDCG@10 and Hit@10 of the single target, and ``match@10``, the share of the top
10 that has the requested genre. Writes ``OUT/requests.csv``, ``OUT/requests.md`` and the per-user
values ``OUT/runs/requests.users.csv``.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from recbole_llmgen import per_user

TEMPLATES = (
    "I feel like watching a {genre} movie.",
    "Recommend me a good {genre} film.",
    "Something in the {genre} genre, please.",
)
GENRE_WORDS = {"Sci-Fi": "science fiction", "Film-Noir": "film noir", "Children's": "children's"}
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # request_weight: the LLM's order ... the request-aware retriever's
FOCUSES = (0.5, 1.0, 2.0, 4.0)  # request_focus: how strongly the request steers retrieval
TOPK = 10
VERSION = 3  # part of a finished protocol's record: a change to the protocol reruns it
IGNORED_GENRES = {"unknown", ""}


def request_for(genres: list[str], user: int, seed: int) -> tuple[str, str | None]:
    """(request text, requested genre) for a target with ``genres``; seeded by user."""
    rng = np.random.default_rng(seed * 1_000_003 + int(user))
    known = [g for g in genres if g not in IGNORED_GENRES]
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    if not known:
        return "I feel like watching a good movie.", None
    genre = known[int(rng.integers(len(known)))]
    return template.format(genre=GENRE_WORDS.get(genre, genre.lower())), genre


def ranking_metrics(top: list[int], target: int, genre_items: set[int] | None) -> dict[str, float]:
    """NDCG@10, Hit@10 of the one target and the share of the top 10 with the requested genre."""
    rank = top.index(target) + 1 if target in top[:TOPK] else None
    share = float("nan") if genre_items is None else sum(i in genre_items for i in top[:TOPK]) / TOPK
    return {
        "ndcg@10": 1.0 / math.log2(rank + 1) if rank else 0.0,
        "hit@10": 1.0 if rank else 0.0,
        "match@10": share,
    }


def genre_index(model, field: str) -> tuple[list[list[str]], dict[str, set[int]]]:
    """Each item's genres and, per genre, its items (from the .item field ``field``)."""
    loaded = model.retriever.item_fields()
    if field not in loaded:
        raise ValueError(f"request_field: {field!r} is not a loaded item field (item fields: {loaded})")
    genres = [value.split() for value in model.retriever.item_field(field)]
    items: dict[str, set[int]] = {}
    for item, names in enumerate(genres):
        for name in names:
            items.setdefault(name, set()).add(item)
    return genres, items


def evaluate_split(model, loader, field: str, seed: int, baselines: bool = True) -> dict:
    """Every ranking of the protocol for the users of ``loader`` (RecBole's full-sort loader);
    ``baselines=False``: only LLMGen's request lists (what choosing the weight needs)."""
    from recbole_llmgen import two_stage
    from recbole_llmgen.requests import score_requests, top_items

    genres, by_genre = genre_index(model, field)
    tokens_u = loader._dataset.field2id_token[model.USER_ID]
    tokens_i = loader._dataset.field2id_token[model.ITEM_ID]
    out = {"users": [], "targets": [], "requests": [], "genre_items": [], "classic": [], "classic_genre": [],
           "llm_plain": [], "histories": [], "user_ids": []}  # fmt: skip
    model.eval()
    for batch in loader:
        interaction = batch[0]
        users = interaction[model.USER_ID].tolist()
        targets = interaction[model.ITEM_ID].tolist()
        seqs, lens = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
        histories = [seqs[b, : lens[b]].tolist() for b in range(len(users))]
        asked = [request_for(genres[t], u, seed) for u, t in zip(users, targets)]
        out["histories"].extend(histories)
        out["user_ids"].extend(users)
        out["users"].extend(str(tokens_u[u]) for u in users)
        out["targets"].extend(targets)
        out["requests"].extend(r for r, _ in asked)
        out["genre_items"].extend(by_genre.get(genre) if genre else None for _, genre in asked)
        if not baselines:
            continue
        classic = two_stage.candidate_scores(model.retriever.candidate_model(), interaction, model.device)
        with torch.no_grad():
            plain = model.full_sort_predict(interaction).cpu()
        for b, (user, history) in enumerate(zip(users, histories)):
            seen = set(model.retriever.seen(user, history))
            genre = asked[b][1]
            wanted = by_genre.get(genre) if genre else None
            out["classic"].append(top_items(classic[b], TOPK, seen))
            if wanted:
                restricted = torch.full_like(classic[b], -math.inf)
                ids = torch.tensor(sorted(wanted))
                restricted[ids] = classic[b][ids]
                out["classic_genre"].append(top_items(restricted, TOPK, seen))
            else:
                out["classic_genre"].append(out["classic"][-1])
            out["llm_plain"].append(top_items(plain[b], TOPK, seen))
    out["target_tokens"] = [str(tokens_i[t]) for t in out["targets"]]
    # every user's request list at once: the LLM scores many users per pass (a loader batch holds ~2)
    histories, users = out.pop("histories"), out.pop("user_ids")
    out["scored"] = score_requests(model, histories, out["requests"], users, focuses=FOCUSES)
    return out


def metrics_of(tops: list[list[int]], split: dict) -> dict[str, np.ndarray]:
    rows = [ranking_metrics(top, t, g) for top, t, g in zip(tops, split["targets"], split["genre_items"])]
    return {key: np.array([r[key] for r in rows], dtype=np.float64) for key in ("ndcg@10", "hit@10", "match@10")}


def choose_weight(split: dict) -> tuple[tuple[float, float], dict[tuple[float, float], float]]:
    """(request_weight, request_focus) with the best mean NDCG@10 on ``split`` (ties to the
    smaller weight, then the smaller focus), and the whole grid."""
    grid = {}
    for focus in FOCUSES:
        for weight in WEIGHTS:
            tops = [[i for i, _ in s.ranked(weight, focus, TOPK)] for s in split["scored"]]
            grid[(weight, focus)] = float(metrics_of(tops, split)["ndcg@10"].mean())
    best = max(grid.values())
    return min(key for key, value in grid.items() if value == best), grid


def run_request_protocol(spec: dict, out: str, classic_name: str) -> list[dict]:
    """Build LLMGen from the benchmark's ``spec`` (config with its candidate model file), evaluate
    the protocol on valid (weight) and test, write the files, return the rows."""
    from recbole.utils import init_logger

    from recbole_llmgen.integration import (
        build_config,
        build_model,
        load_checkpoint,
        load_data,
        only_users,
        recbole_argv,
    )

    with recbole_argv([]):
        config = build_config("LLMGen", spec["dataset"], spec["config"], spec.get("config_files"))
    init_logger(config)
    field, seed = config["request_field"] or "class", int(config["seed"])
    train_data, valid_data, test_data = load_data(config)
    if spec.get("eval_users"):  # the benchmark's seeded sample: the same users as every row of its table
        valid_data, test_data = only_users(valid_data, spec["eval_users"]), only_users(test_data, spec["eval_users"])
    model = build_model(config, train_data)
    if spec.get("model_file"):  # a trained LLMGen: its checkpoint's weights and fusion weight
        checkpoint = load_checkpoint(spec["model_file"], map_location=model.device)
        model.load_state_dict(checkpoint["state_dict"])
        model.load_other_parameter(checkpoint.get("other_parameter"))
    valid = evaluate_split(model, valid_data, field, seed, baselines=False)
    (weight, focus), grid = choose_weight(valid)
    test = evaluate_split(model, test_data, field, seed)
    rankings = {
        f"{classic_name} (no request)": test["classic"],
        f"{classic_name} filtered to the requested genre": test["classic_genre"],
        "LLMGen (no request)": test["llm_plain"],
        f"LLMGen with request (weight {weight:g}, focus {focus:g}: chosen on valid)": [
            [i for i, _ in s.ranked(weight, focus, TOPK)] for s in test["scored"]
        ],
        f"LLMGen with request, LLM order only (weight 0, focus {focus:g})": [
            [i for i, _ in s.ranked(0.0, focus, TOPK)] for s in test["scored"]
        ],
        f"request-aware retriever alone (weight 1, focus {focus:g})": [
            [i for i, _ in s.ranked(1.0, focus, TOPK)] for s in test["scored"]
        ],
    }
    values = {name: metrics_of(tops, test) for name, tops in rankings.items()}
    rows = []
    reference = values[f"{classic_name} filtered to the requested genre"]
    for name, metrics in values.items():
        row = {"ranking": name, "users": len(test["users"])}
        for key, column in metrics.items():
            finite = column[np.isfinite(column)]
            row[f"test_{key}"] = round(float(finite.mean()), 4) if len(finite) else None
            if key != "match@10" and len(finite):
                low, high = per_user.bootstrap_interval(finite)
                row[f"test_{key}_low"], row[f"test_{key}_high"] = round(low, 4), round(high, 4)
        mean, low, high = per_user.paired_difference(metrics["ndcg@10"], reference["ndcg@10"])
        row["diff_ndcg@10"], row["diff_ndcg@10_low"], row["diff_ndcg@10_high"] = (
            round(mean, 4), round(low, 4), round(high, 4))  # fmt: skip
        rows.append(row)
    sample = f"{len(test['users'])} users" if not spec.get("eval_users") else (
        f"{len(test['users'])} of {spec.get('eval_users_of', '?')} users, a seeded sample, seed {spec.get('eval_users_seed', '?')}")  # fmt: skip
    write_request_outputs(rows, values, test, out, {"grid": grid, "field": field, "users": sample,
                                                    "classic": classic_name, "dataset": spec["dataset"]})  # fmt: skip
    return rows


def write_request_outputs(rows: list[dict], values: dict, test: dict, out: str, meta: dict) -> None:
    import pandas as pd

    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    pd.DataFrame(rows).to_csv(os.path.join(out, "requests.csv"), index=False)
    frame = pd.DataFrame({"user_id": test["users"], "targets": test["target_tokens"], "request": test["requests"]})
    for name, metrics in values.items():
        for key, column in metrics.items():
            frame[f"{name} | {key}"] = column
    frame.to_csv(os.path.join(out, "runs", "requests.users.csv"), index=False)
    grid = "; ".join(f"w {w:g} focus {f:g}: {v:.4f}" for (w, f), v in meta["grid"].items())
    lines = [
        f"Request protocol on {meta['dataset']} (test split, full ranking, {meta['users']}): each user asks "
        f"for one genre of their test target (the .item field `{meta['field']}`, drawn per user with a fixed seed, "
        f'in fixed templates such as "{TEMPLATES[0].format(genre="comedy")}"); the target is never named. '
        f"match@10 = share of the top 10 with the requested genre. LLMGen's request_weight (w) and request_focus "
        f"were chosen on the valid split by NDCG@10 (grid: {grid}). Difference = paired NDCG@10 difference to the genre-filtered "
        f"{meta['classic']} (95% bootstrap; * = excludes 0).",
        "",
        "| ranking | test NDCG@10 [95% CI] | test Hit@10 [95% CI] | match@10 | NDCG@10 difference [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " *" if r["diff_ndcg@10_low"] > 0 or r["diff_ndcg@10_high"] < 0 else ""
        lines.append(
            f"| {r['ranking']} | {r['test_ndcg@10']:.4f} [{r['test_ndcg@10_low']:.4f}, {r['test_ndcg@10_high']:.4f}] "
            f"| {r['test_hit@10']:.4f} [{r['test_hit@10_low']:.4f}, {r['test_hit@10_high']:.4f}] "
            f"| {r['test_match@10']:.3f} | {r['diff_ndcg@10']:+.4f} [{r['diff_ndcg@10_low']:+.4f}, "
            f"{r['diff_ndcg@10_high']:+.4f}]{mark} |"
        )
    with open(os.path.join(out, "requests.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
