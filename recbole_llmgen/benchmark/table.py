"""The table: labels that say how each row ranked, bootstrap intervals over users, paired
differences, and ``benchmark.csv`` / ``benchmark.md`` (the plots: :mod:`recbole_llmgen.benchmark.plot`)."""

from __future__ import annotations

import os

from recbole_llmgen import per_user
from recbole_llmgen.benchmark.choose import best_candidate, row_name
from recbole_llmgen.benchmark.plan import TEXT_RETRIEVER
from recbole_llmgen.benchmark.run import rounded, variant_users_file
from recbole_llmgen.regime import Regime, check_targets

TABLE_METRICS = ("ndcg@10", "hit@10", "mrr@10", "recall@10")


def how_llmgen_ranks(row: dict) -> str:
    """What an LLMGen row did, truthfully: generated from the catalogue or reranked a candidate list."""
    source = str(row["candidate_source"])
    name = {"pop": "Pop", "text": "the text retriever"}.get(source, os.path.basename(source).split("-")[0])
    if row.get("item_id_format") == "token":
        return "one token per item, ranks the whole catalogue"
    if row.get("score_method") == "generate":
        if source == "none":
            return "generates from the catalogue, no candidate model"
        if row.get("variant") == "fused":
            return f"generates, fused with {name}'s score of each item"
        return f"generates from the catalogue, {name} below the generated items"
    top = f" top {row['num_candidates']}" if row.get("num_candidates") else ""
    return f"reranks {name}'s{top}"


def row_label(row: dict) -> str:
    notes = []
    if row.get("variant") == "LLM only":
        notes.append("LLM only")
    elif row.get("variant") == "fused":
        notes.append(f"fused, LLM weight {row.get('fusion_weight')}")
    if row["model"] == "LLMGen" and (row.get("trainable_parameters") or 0) > 0:
        notes.append("fine-tuned")
    if row.get("length_penalty_auto") and row.get("length_penalty") is not None:
        notes.append(f"length penalty {row['length_penalty']:g} chosen on valid")
    if row["model"] == "LLMGen" and row.get("candidate_source"):
        notes.append(how_llmgen_ranks(row))
        if (row.get("processes") or 1) > 1:
            notes.append(f"{row['processes']} processes")
    if row["model"] == TEXT_RETRIEVER:
        notes.append("sentence-encoder similarity to the history, no LLM")
    if row.get("stopped_by") == "cap" and row.get("epoch_cap"):
        notes.append(f"capped at {row['epoch_cap']} epoch{'s' if row['epoch_cap'] != 1 else ''}")
    return f"{row['model']} ({'; '.join(notes)})" if notes else row["model"]


INTERVAL_METRICS = ("ndcg@10", "hit@10")


def user_frames(rows: list[dict], out: str) -> dict:
    """``{row name: per-user test metrics}`` of every finished row that wrote them."""
    frames = {}
    for row in rows:
        path = os.path.abspath(per_user.users_file(os.path.join(out, "runs", row["model"])))
        if row.get("variant") == "LLM only":
            path = variant_users_file(path)
        if row.get("status") == "ok" and os.path.isfile(path):
            frames[row_name(row)] = per_user.read_users(path)
    return frames


def add_intervals(rows: list[dict], out: str, meta: dict | None = None) -> None:
    """Per row: users evaluated and 95% bootstrap intervals of test NDCG@10 / Hit@10; per LLMGen
    row: the paired interval of its difference to the best classic model (by validation, as for
    its candidates). Every model of the run must have evaluated the same users on the same targets.
    A regime that selects users (cold users or items): each row's test metrics become the means over
    those users (the per-user values RecBole's figures average)."""
    meta = meta or {}
    regime, users = meta.get("regime") or Regime(), meta.get("users")
    frames = user_frames(rows, out)
    if frames:
        first, reference = next(iter(frames.items()))
        for model, frame in frames.items():
            per_user.same_evaluation(reference, frame, (first, model))  # same users and targets, or a named error
        if users is not None:
            try:
                check_targets(reference, users, first)
            except ValueError:
                if not regime.is_default:
                    raise
                meta["users"] = users = None  # RecBole filtered the data: the file's counts do not apply
    if regime.selects_users:
        frames = {name: frame.loc[users.index] for name, frame in frames.items()}
    meta["frames"] = frames  # the per-user values every interval of the table was computed from
    best = best_candidate(rows)
    for row in rows:
        frame = frames.get(row_name(row))
        if frame is None:
            continue
        row["users"] = len(frame)
        if users is not None:
            row["avg_train_items"] = round(float(users["train_items"].mean()), 2)
        if regime.selects_users:
            for metric in frame.columns.drop("targets", errors="ignore"):
                row[f"test_{metric}"] = rounded(frame[metric].mean())
        for metric in INTERVAL_METRICS:
            if metric in frame.columns:
                low, high = per_user.bootstrap_interval(frame[metric].to_numpy(float))
                row[f"test_{metric}_low"], row[f"test_{metric}_high"] = round(low, 4), round(high, 4)
        if row["model"] == "LLMGen" and best is not None and best["model"] in frames:
            row["compared_to"] = best["model"]
            for metric in INTERVAL_METRICS:
                mean, low, high = per_user.paired_difference(*per_user.aligned(frame, frames[best["model"]], metric))
                row[f"diff_{metric}"], row[f"diff_{metric}_low"], row[f"diff_{metric}_high"] = (
                    round(mean, 4),
                    round(low, 4),
                    round(high, 4),
                )


def _trained(row: dict) -> str:
    if row.get("stopped_by") is None:
        return "-"
    if row["stopped_by"] == "none":
        return "0 / zero-shot" if row.get("trainable_parameters") == 0 else "0 / none"
    best = "" if row.get("best_epoch") is None else f" ({row['best_epoch'] + 1})"
    resumed = "" if row.get("resumed_from_epoch") is None else f", resumed after {row['resumed_from_epoch'] + 1}"
    return f"{row['epochs_trained']}{best} / {row['stopped_by']} (cap {row['epoch_cap']}{resumed})"


def _interval(row: dict, key: str) -> str:
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    return "-" if low is None or high is None else f"[{low:.4f}, {high:.4f}]"


def _difference(row: dict, metric: str) -> str:
    if row.get(f"diff_{metric}") is None:
        return "-"
    low, high = row[f"diff_{metric}_low"], row[f"diff_{metric}_high"]
    mark = " *" if low > 0 or high < 0 else ""
    return f"{row[f'diff_{metric}']:+.4f} [{low:+.4f}, {high:+.4f}] vs {row['compared_to']}{mark}"


def _cell(value, digits=4) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict], meta: dict) -> str:
    head = (
        f"Dataset {meta['dataset']}, protocol {meta['protocol']} (leave-one-out, time order), "
        f"RecBole evaluator. Valid = best validation epoch; test = that checkpoint. A zero-shot LLMGen "
        f"selects nothing on the valid split and is not evaluated there (valid '-'; --llm-valid does). "
        f"[low, high]: 95% bootstrap interval over the evaluated users ({per_user.RESAMPLES} resamples, "
        f"seed {per_user.SEED}); LLMGen's difference to its candidate source (the best classic model or text retriever by validation) is paired "
        f"(the same resampled users for both); * = the interval excludes 0.\n\n{rule_line(meta)}{regime_line(meta)}"
        f"{machine_line(rows)}"
        "| model | users | test NDCG@10 [95% CI] | test Hit@10 [95% CI] | test MRR@10 | valid NDCG@10 | valid Hit@10 "
        "| NDCG@10 difference [95% CI] | epochs (best) / stopped by | train s | test eval s | peak MB "
        "| trainable / total params | status |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        ok = r.get("status") == "ok"
        params = f"{r.get('trainable_parameters', 0):,} / {r.get('total_parameters', 0):,}" if ok else "-"
        status = "ok" if ok else f"failed: {str(r.get('error', ''))[:120]}"
        ndcg = f"{_cell(r.get('test_ndcg@10'))} {_interval(r, 'test_ndcg@10')}" if ok else "-"
        hit = f"{_cell(r.get('test_hit@10'))} {_interval(r, 'test_hit@10')}" if ok else "-"
        lines.append(
            f"| {row_label(r)} | {_cell(r.get('users'))} | {ndcg} | {hit} | "
            f"{_cell(r.get('test_mrr@10'))} | {_cell(r.get('valid_ndcg@10'))} | {_cell(r.get('valid_hit@10'))} | "
            f"{_difference(r, 'ndcg@10')} | {_trained(r)} | {_cell(r.get('train_seconds'), 1)} | "
            f"{_cell(r.get('eval_seconds'), 1)} | "
            f"{_cell(r.get('peak_memory_mb'), 0)} | {params} | {status} |"
        )
    return head + "\n".join(lines) + "\n"


RULES_SAID = {
    "mask": "no model ranks an item its user interacted with before the evaluated one (RecBole masks them for "
    "general models only; here for its sequential models and LLMGen as well)",
    "keep": "every model ranks every item, those its user already interacted with included (RecBole's rule for "
    "sequential models; here for general models and LLMGen as well)",
}


def rule_line(meta: dict) -> str:
    """The ranking rule every row was evaluated under (a line)."""
    rule = meta.get("seen_items")
    if rule is None:
        return ""
    if meta.get("protocol") != "full":
        return (
            f"Seen items: {rule}; the {meta['protocol']} protocol ranks each user's target among sampled items "
            "the user never interacted with, so the rule changes nothing there.\n\n"
        )
    return f"Seen items: {rule}: {RULES_SAID[rule]}.\n\n"


def paired_comparisons(rows: list[dict], frames: dict) -> list[dict]:
    """Per LLMGen row and every other finished row that is not LLMGen (classic models, the text
    retriever): the paired difference of test NDCG@10 and Hit@10 (LLMGen minus the other, the same
    resampled users for both) with its 95% interval."""
    found = []
    llm_rows = [r for r in rows if r["model"] == "LLMGen" and row_name(r) in frames]
    others = [r for r in rows if r["model"] != "LLMGen" and row_name(r) in frames]
    for row in llm_rows:
        for other in others:
            pair = {"row": row_label(row), "against": row_name(other)}
            for metric in INTERVAL_METRICS:
                a, b = per_user.aligned(frames[row_name(row)], frames[row_name(other)], metric)
                mean, low, high = per_user.paired_difference(a, b)
                pair[metric] = round(mean, 4)
                pair[f"{metric}_low"], pair[f"{metric}_high"] = round(low, 4), round(high, 4)
            found.append(pair)
    return found


def verdict(pair: dict, metric: str = "ndcg@10") -> str:
    """better, worse, or no difference shown (the interval holds 0)."""
    if pair[f"{metric}_low"] > 0:
        return "better"
    if pair[f"{metric}_high"] < 0:
        return "worse"
    return "no difference shown"


def paired_markdown(pairs: list[dict]) -> str:
    """The paired comparisons as a markdown section ('' when there are none)."""
    if not pairs:
        return ""
    lines = [
        "",
        "Paired differences of each LLMGen row to every other row (LLMGen minus it, per user; 95% bootstrap "
        f"interval over the same resampled users, {per_user.RESAMPLES} resamples):",
        "",
        "| LLMGen row | against | NDCG@10 difference [95% CI] | Hit@10 difference [95% CI] | verdict (NDCG@10) |",
        "|---|---|---|---|---|",
    ]
    for p in pairs:
        cells = [f"{p[m]:+.4f} [{p[f'{m}_low']:+.4f}, {p[f'{m}_high']:+.4f}]" for m in INTERVAL_METRICS]
        lines.append(f"| {p['row']} | {p['against']} | {cells[0]} | {cells[1]} | {verdict(p)} |")
    return "\n".join(lines) + "\n"


def machine_line(rows: list[dict]) -> str:
    """Where the rows were measured (a line; rows reused from an earlier run may come from another
    machine: then each machine with its rows), with the LLM's weight dtype, or '' for rows that do
    not say (written before rows recorded it)."""
    if not any(r.get("machine") for r in rows):
        return ""
    machines: dict[str, list[str]] = {}
    for r in rows:
        names = machines.setdefault(r.get("machine") or "not recorded", [])
        name = r["model"] + (f" (LLM weights {r['llm_dtype']})" if r.get("llm_dtype") else "")
        if name not in names:
            names.append(name)
    if len(machines) == 1:
        machine = next(iter(machines))
        dtypes = sorted({r["llm_dtype"] for r in rows if r.get("llm_dtype")})
        return f"Machine: {machine}" + (f"; LLM weights {', '.join(dtypes)}" if dtypes else "") + ".\n\n"
    return (
        "Machines (rows reused from earlier runs keep theirs): "
        + "; ".join(f"{machine}: {', '.join(labels)}" for machine, labels in machines.items())
        + ".\n\n"
    )


def regime_line(meta: dict) -> str:
    """The data regime, the users evaluated and their average training history (a line), or ''."""
    regime, users, sample = meta.get("regime") or Regime(), meta.get("users"), meta.get("sample")
    evaluated = f"{len(users)}" if users is not None else ""
    if sample:
        evaluated = f"{len(sample['users'])} of {sample['of']} (a seeded sample, seed {sample['seed']})"
    if users is None:
        return "" if regime.is_default else f"Regime: {regime.describe()}.\n\n"
    text = (
        f"Regime: {regime.describe()}. Evaluated users: {evaluated}, average training history "
        f"{users['train_items'].mean():.1f} interactions (median {users['train_items'].median():g})"
    )
    if regime.selects_users:
        text += "; test columns over these users, valid columns over all users"
    return text + ".\n\n"
