"""``run_benchmark``: the models of a run in order (classic models, the text retriever, LLMGen on
the best candidate source), each reused or run, then the table and the plots."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from recbole_llmgen.benchmark.cache import read_record, run_hash, write_record
from recbole_llmgen.benchmark.choose import best_candidate, best_classic, candidate_source_of, expand
from recbole_llmgen.benchmark.inputs import row_inputs
from recbole_llmgen.benchmark.plan import (
    DEFAULT_MODELS,
    DEFAULT_SEED,
    check_arguments,
    chooses_candidates,
    data_folder,
    llm_path_of,
    ordered_models,
    regime_data,
    row_model,
    row_spec,
    sample_users,
)
from recbole_llmgen.benchmark.plot import plot, plot_curves
from recbole_llmgen.benchmark.run import progress_file, resumable, run_in_subprocess
from recbole_llmgen.benchmark.table import add_intervals, markdown_table, paired_comparisons, paired_markdown, row_label
from recbole_llmgen.regime import REGIME_KEYS, Regime


def run_benchmark(
    dataset: str = "ml-100k",
    models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
    protocol: str = "full",
    config_files: list[str] | None = None,
    overrides: dict | None = None,
    out: str = "results/benchmark",
    log: Callable[[str], None] = print,
    runner: Callable[[dict, str], dict] = run_in_subprocess,
    llm_valid: bool = False,
    llm_nproc: int = 1,
    regime: Regime | None = None,
    requests: bool = False,
    eval_users: int | None = None,
) -> list[dict]:
    """Run ``models`` on ``dataset`` (classic models first), write the three files, return the rows.

    ``llm_valid``: also evaluate a zero-shot LLMGen on the valid split (it selects nothing there;
    off by default to keep the default run within a laptop budget). Trained models always validate.
    ``llm_nproc``: LLMGen runs in that many processes (RecBole's multi-process mode: the same
    metrics, evaluation split between them); the classic models, cheap to run, stay in one.
    ``regime``: sparse training data and cold-start users or items (:mod:`recbole_llmgen.regime`).
    ``requests``: also the request protocol (:mod:`recbole_llmgen.request_bench`): requests.md/.csv.
    ``eval_users``: evaluate a seeded sample of that many test users (the same users on the valid
    split and for every model; models still train on all training data): :func:`sample_users`.
    The ``seen_items`` override (default ``mask``) is the ranking rule of every row.
    """
    overrides = check_arguments(models, protocol, config_files, overrides, llm_nproc)
    eval_users = overrides.pop("eval_users", eval_users)  # the config key (--eval_users=N) means the option
    regime = regime or Regime()
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    data_path, users = regime_data(regime, dataset, overrides, config_files, out)
    folder = data_folder(dataset, overrides, config_files, out, data_path)
    sample, users = sampled(users, eval_users, overrides, log)
    choose = chooses_candidates(models, overrides, config_files)
    ordered = ordered_models(models, choose, requests)
    rows: list[dict] = []
    specs: dict[str, dict] = {}
    for index, model in enumerate(ordered, 1):
        spec = row_spec(model, dataset, protocol, overrides, out, config_files, data_path, sample)
        spec["inputs"] = row_inputs(spec, folder, llm_path_of(spec) if spec["model"] == "LLMGen" else "")
        if model == "LLMGen":
            if llm_valid:
                spec["llm_valid"] = True
            if llm_nproc > 1:
                spec["nproc"] = llm_nproc
            if choose:  # the request protocol compares with the best classic model, reranking its candidates
                pick_candidates(spec, best_classic(rows) if requests else best_candidate(rows))
        specs[model] = spec
        rows.extend(expand(reuse_or_run(spec, out, runner, log, f"[{index}/{len(ordered)}]")))
    meta = {"dataset": dataset, "protocol": protocol, "overrides": overrides, "regime": regime, "users": users}
    meta.update(sample=sample, seen_items=overrides["seen_items"])
    write_outputs(rows, out, meta)
    if requests:
        run_requests(rows, specs.get("LLMGen"), out, log)
    return rows


def sampled(users, eval_users: int | None, overrides: dict, log: Callable[[str], None]):
    """``(sample, users)``: the seeded sample of ``eval_users`` test users (None: all of them) and
    the per-user table restricted to it."""
    if eval_users is None:
        return None, users
    sample = sample_users(users, eval_users, int(overrides.get("seed", DEFAULT_SEED)), log)
    if sample is not None:
        users = users[users.index.astype(str).isin(sample["users"])]
    return sample, users


def pick_candidates(spec: dict, best: dict | None) -> None:
    """LLMGen reranks the candidates of ``best`` (a row run before it), when there is one."""
    if best is not None:
        spec["config"]["candidate_source"] = candidate_source_of(best)


def reuse_or_run(spec: dict, out: str, runner, log: Callable[[str], None], counter: str) -> dict:
    """The row of ``spec``: the recorded one when its hash matches (and its per-user file is
    there), else a fresh run through ``runner``, recorded."""
    model = row_model(spec)
    digest = run_hash(spec)
    record, log_path = os.path.join(out, "runs", f"{model}.json"), os.path.join(out, "runs", f"{model}.log")
    previous = read_record(record)
    if (
        previous
        and previous.get("hash") == digest
        and previous.get("status") == "ok"
        and os.path.isfile(spec["users_file"])  # a row from before per-user files runs again
    ):
        log(f"{counter} {model}: finished before with the same config, reused")
        return previous
    spec["hash"] = digest  # the run's progress file names it: only this very run resumes from it
    state = resumable(spec)
    if state is not None:
        log(f"{counter} {model}: resuming after epoch {state['epoch']} from {state['checkpoint']} (log: {log_path})")
    else:
        log(f"{counter} {model}: running (log: {log_path})")
    start = time.perf_counter()
    if runner is run_in_subprocess:  # the default: its progress on the console
        row = runner(spec, log_path, console=log)
    else:
        row = runner(spec, log_path)
    row["hash"] = digest
    row["inputs"] = spec.get("inputs")
    row["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_record(record, row)
    progress = progress_file(spec)
    if row.get("status") == "ok" and progress and os.path.isfile(progress):
        os.remove(progress)  # finished: the record is the row now
    if row.get("status") == "ok":
        log(f"    test ndcg@10 {row.get('test_ndcg@10')}, hit@10 {row.get('test_hit@10')} ({row['wall_seconds']} s)")
    else:
        log(f"    FAILED: {row.get('error')}")
    return row


def run_requests(rows: list[dict], spec: dict | None, out: str, log: Callable[[str], None]) -> None:
    """The request protocol over the run's LLMGen (its checkpoint when it was trained) and best
    classic model; reused while LLMGen's run and the classic model file are unchanged."""
    from recbole_llmgen.request_bench import VERSION, run_request_protocol

    llm = next((r for r in rows if r["model"] == "LLMGen" and r.get("status") == "ok"), None)
    best = best_classic(rows)
    if spec is None or llm is None or best is None:
        log("requests: skipped (LLMGen or every classic model failed)")
        return
    spec = {**spec, "model_file": llm.get("model_file") if (llm.get("trainable_parameters") or 0) > 0 else None}
    # the protocol compares with the best classic model and reranks its candidates, whatever LLMGen's were
    spec["config"] = {**spec["config"], "candidate_source": best["model_file"]}
    digest = f"{run_hash(spec)}-{spec['model_file']}-v{VERSION}"
    record = os.path.join(out, "runs", "requests.json")
    previous = read_record(record)
    if previous and previous.get("hash") == digest and os.path.isfile(os.path.join(out, "requests.md")):
        log("requests: finished before with the same LLMGen run, reused")
        return
    log("requests: the request protocol (valid: weight; test: rows)")
    start = time.perf_counter()
    request_rows = run_request_protocol(spec, out, best["model"])
    write_record(record, {"hash": digest, "rows": request_rows, "wall_seconds": round(time.perf_counter() - start, 1)})
    log(f"    wrote {os.path.join(out, 'requests.md')} ({time.perf_counter() - start:.0f} s)")


def write_outputs(rows: list[dict], out: str, meta: dict) -> None:
    """``benchmark.csv`` (a row per model, the ranking rule and the regime in columns), ``paired.csv``
    (each LLMGen row against every other row), ``benchmark.md`` (both tables), the plots."""
    import pandas as pd

    add_intervals(rows, out, meta)
    pairs = paired_comparisons(rows, meta.get("frames") or {})
    frame = pd.DataFrame(rows)
    frame.insert(0, "label", [row_label(r) for r in rows])
    frame["seen_items"] = [r.get("seen_items") or meta.get("seen_items") for r in rows]
    regime = meta.get("regime") or Regime()
    for key in REGIME_KEYS:
        frame[key] = getattr(regime, key)
    frame.to_csv(os.path.join(out, "benchmark.csv"), index=False)
    pd.DataFrame(pairs, columns=list(pairs[0]) if pairs else ["row", "against"]).to_csv(
        os.path.join(out, "paired.csv"), index=False
    )
    with open(os.path.join(out, "benchmark.md"), "w", encoding="utf-8") as f:
        f.write(markdown_table(rows, meta) + paired_markdown(pairs))
    plot(rows, os.path.join(out, "benchmark.png"), meta)
    plot_curves(rows, os.path.join(out, "learning_curve.png"))
