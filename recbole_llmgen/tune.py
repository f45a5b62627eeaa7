"""``recbole-llmgen tune``: RecBole's hyper-parameter search (``HyperTuning``) over any model's keys.

The params file is the one RecBole's ``run_hyper.py`` reads: one ``name kind values`` line per key,
kinds ``choice [a,b,...]``, ``uniform low,high``, ``quniform low,high,q``, ``loguniform low,high``
(``#`` lines and blank lines ignored). Every trial runs like a benchmark row, in its own process
(:func:`recbole_llmgen.benchmark.run_in_subprocess`): a failing trial is recorded and the search
goes on. Trials are selected on the validation metric only (``valid_metric``); the test metrics are
reported beside it. ``OUT/tune.csv`` (one row per trial: parameters, valid and test metrics,
seconds, status) and ``OUT/tune.md`` are rewritten after every trial, ``OUT/best.yaml`` holds the
best parameters (a file ``--config_files`` accepts); a rerun with the same OUT reuses every
finished trial, so an interrupted search loses at most the trial that was running.
"""

from __future__ import annotations

import ast
import json
import math
import os
import time
from collections.abc import Callable

from recbole_llmgen import benchmark

ALGOS = ("exhaustive", "random", "bayes")
KINDS = {"choice": "[a,b,...]", "uniform": "low,high", "quniform": "low,high,q", "loguniform": "low,high"}
FAILED_SCORE = -1e9  # a failed trial, for the search (metrics to maximise are >= 0)


def read_params_file(path: str) -> dict[str, tuple[str, object]]:
    """``{name: (kind, values)}`` of a RecBole params file; a malformed line is a named error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"params_file: {path!r} does not exist")
    params: dict[str, tuple[str, object]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.split(" ")
            allowed = "; ".join(f"{k} {v}" for k, v in KINDS.items())
            if len(parts) < 3 or parts[1] not in KINDS:
                raise ValueError(
                    f"params_file: line {number} {text!r} is not 'name kind values' with kind one of: {allowed} "
                    "(e.g. 'num_candidates choice [10,20]', 'learning_rate loguniform -8,0')"
                )
            name, kind, raw = parts[0], parts[1], "".join(parts[2:])
            try:
                if kind == "choice":
                    values = ast.literal_eval(raw)
                    if not isinstance(values, list) or not values:
                        raise ValueError
                else:
                    values = [float(v) for v in raw.split(",")]
                    if len(values) != (3 if kind == "quniform" else 2):
                        raise ValueError
            except (ValueError, SyntaxError):
                raise ValueError(
                    f"params_file: line {number} {text!r}: {kind} takes {KINDS[kind]}, got {raw!r}"
                ) from None
            if name in params:
                raise ValueError(f"params_file: line {number}: {name!r} appears twice")
            params[name] = (kind, values)
    if not params:
        raise ValueError(f"params_file: {path!r} has no 'name kind values' line")
    return params


def hyperopt_space(params: dict[str, tuple[str, object]]) -> dict:
    """The search space RecBole's ``_build_space_from_file`` would build (comments allowed here)."""
    from hyperopt import hp

    space = {}
    for name, (kind, values) in params.items():
        if kind == "choice":
            space[name] = hp.choice(name, values)
        elif kind == "quniform":
            space[name] = hp.quniform(name, *values)
        else:
            space[name] = getattr(hp, kind)(name, *values)
    return space


def trial_config(dataset: str, config_files: list[str] | None, settings: dict) -> dict:
    """``settings`` as a run's config dict: the default data_path unless set, every column of a
    dataset without a RecBole yaml (as ``recbole-llmgen run`` and the benchmark do)."""
    from recbole_llmgen.integration import every_column_unless_set, with_data_path

    return every_column_unless_set(dataset, with_data_path(settings, config_files))


def known_keys(model: str, dataset: str, config_files: list[str] | None, overrides: dict) -> set[str]:
    """Every key RecBole's Config knows for ``model`` on ``dataset`` (its defaults and the model's)."""
    from recbole_llmgen.integration import build_config, recbole_argv

    with recbole_argv([]):
        config = build_config(model, dataset, trial_config(dataset, config_files, overrides), config_files)
    return set(config.final_config_dict)


def _jsonable(value):
    return value.item() if hasattr(value, "item") else value


def run_tune(
    model: str,
    dataset: str,
    params_file: str,
    algo: str = "exhaustive",
    max_evals: int = 100,
    config_files: list[str] | None = None,
    overrides: dict | None = None,
    out: str = "results/tune",
    log: Callable[[str], None] = print,
    runner: Callable[[dict, str], dict] = benchmark.run_in_subprocess,
) -> list[dict]:
    """Search ``params_file``'s space with RecBole's HyperTuning; returns one row per trial."""
    import pandas as pd
    import yaml
    from recbole.trainer.hyper_tuning import HyperTuning

    if algo not in ALGOS:
        raise ValueError(f"algo: {algo!r} is not allowed; choose one of {', '.join(ALGOS)}")
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
        raise ValueError(f"max_evals: expected a number of trials >= 1, got {max_evals!r}")
    for path in config_files or []:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config_files: {path!r} does not exist")
    overrides = dict(overrides or {})
    space = read_params_file(params_file)
    known = known_keys(model, dataset, config_files, overrides)
    unknown = [name for name in space if name not in known]
    if unknown:
        raise ValueError(
            f"params_file: {unknown} are not keys that {model} or RecBole know (e.g. learning_rate, "
            f"{'num_candidates, lora_r, ' if model == 'LLMGen' else ''}embedding_size); "
            "see RecBole's overall.yaml and the model's yaml"
        )
    os.makedirs(os.path.join(out, "trials"), exist_ok=True)
    table = os.path.join(out, "tune.csv")
    finished: dict[str, dict] = {}
    earlier: list[dict] = []  # rows of an earlier search in the same OUT: kept in tune.csv
    if os.path.isfile(table):
        for row in pd.read_csv(table).to_dict("records"):
            row = {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
            earlier.append(row)
            if row.get("status") == "ok":
                finished[row["hash"]] = row
    rows: list[dict] = []
    total = math.prod(len(v) for _, v in space.values()) if algo == "exhaustive" else max_evals
    if algo == "exhaustive" and any(kind != "choice" for kind, _ in space.values()):
        raise ValueError("algo: exhaustive enumerates choice parameters only; use random or bayes for ranges")

    def objective(config_dict: dict, config_file_list) -> dict:
        params = {k: _jsonable(v) for k, v in config_dict.items()}
        config = trial_config(
            dataset, config_files, {**overrides, **params, "checkpoint_dir": os.path.join(out, "saved")}
        )
        spec = {"model": model, "dataset": dataset, "config": config, "config_files": config_files, "llm_valid": True}
        digest = benchmark.run_hash(spec)
        if digest in finished:
            row = {**finished[digest], "reused": True}
        else:
            start = time.perf_counter()
            row = runner(spec, os.path.join(out, "trials", f"{digest}.log"))
            row = {k: v for k, v in row.items() if k != "variants"}
            row["seconds"] = round(time.perf_counter() - start, 1)
        row.update({f"param_{k}": v for k, v in params.items()}, hash=digest, trial=len(rows) + 1)
        rows.append(row)
        _write(rows, earlier, out, model, dataset)
        ok = [r for r in rows if r.get("status") == "ok"]
        best = max(ok, key=lambda r: r["best_valid_score"]) if ok else None
        done = "reused" if row.get("reused") else f"{row.get('seconds')} s"
        result = f"valid {row.get('best_valid_score')}" if row.get("status") == "ok" else f"FAILED: {row.get('error')}"
        log(
            f"trial {len(rows)} of {total}: {params} -> {result} ({done}); best so far "
            + (f"{best['best_valid_score']} with {_params(best)}" if best else "none")
        )
        score = row["best_valid_score"] if row.get("status") == "ok" else FAILED_SCORE
        valid = {k[len("valid_") :]: v for k, v in row.items() if k.startswith("valid_") and k != "valid_metric"}
        test = {k[len("test_") :]: v for k, v in row.items() if k.startswith("test_")}
        return {
            "model": model,
            "best_valid_score": score,
            "valid_score_bigger": True,
            "best_valid_result": valid,
            "test_result": test,
        }

    tuner = HyperTuning(
        objective,
        space=hyperopt_space(space),
        fixed_config_file_list=config_files,
        algo=algo,
        max_evals=max_evals,
        early_stop=10**9,  # every requested trial runs
    )
    tuner.run()
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok:
        best = max(ok, key=lambda r: r["best_valid_score"])
        with open(os.path.join(out, "best.yaml"), "w", encoding="utf-8") as f:
            f.write(f"# best of {len(rows)} trials by {best['valid_metric']} on the valid split ({model}, {dataset})\n")
            yaml.safe_dump(_params(best), f, sort_keys=False)
    return rows


def _params(row: dict) -> dict:
    return {k[len("param_") :]: v for k, v in row.items() if k.startswith("param_")}


def _write(rows: list[dict], earlier: list[dict], out: str, model: str, dataset: str) -> None:
    """tune.csv (this search's trials, then an earlier search's rows it did not repeat) and tune.md
    (this search), rewritten atomically after every trial."""
    import pandas as pd

    repeated = {r["hash"] for r in rows}
    kept = [{**r, "trial": "earlier"} for r in earlier if r.get("hash") not in repeated]
    frame = pd.DataFrame(rows + kept)
    params = [c for c in frame.columns if c.startswith("param_")]
    first = ["trial", *params, "status", "best_valid_score"]
    metrics = sorted(c for c in frame.columns if c.startswith(("valid_", "test_")) and c != "valid_metric")
    rest = [c for c in frame.columns if c not in first and c not in metrics]
    frame = frame[[c for c in first if c in frame.columns] + metrics + rest]
    tmp = os.path.join(out, "tune.csv.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, os.path.join(out, "tune.csv"))
    ok = [r for r in rows if r.get("status") == "ok"]
    best = max(ok, key=lambda r: r["best_valid_score"])["trial"] if ok else None
    shown = [c for c in metrics if c.endswith(("ndcg@10", "hit@10"))]
    lines = [
        f"{model} on {dataset}: {len(rows)} trials, selected by the valid metric only (* = best).\n",
        "| trial | " + " | ".join([*(p[len("param_") :] for p in params), *shown, "seconds", "status"]) + " |",
        "|" + "---|" * (len(params) + len(shown) + 3),
    ]
    for row in rows:
        cells = [row.get(p) for p in params] + [row.get(m) for m in shown] + [row.get("seconds")]
        status = "ok" if row.get("status") == "ok" else f"failed: {str(row.get('error', ''))[:80]}"
        mark = " *" if row["trial"] == best else ""
        lines.append(f"| {row['trial']}{mark} | " + " | ".join(json.dumps(c) for c in cells) + f" | {status} |")
    tmp = os.path.join(out, "tune.md.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(out, "tune.md"))
