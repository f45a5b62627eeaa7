"""``recbole-llmgen benchmark``: LLMGen beside RecBole's classic models, one split, one evaluator.

Every model runs through RecBole (its Config, data preparation, trainer and evaluator) on the same
dataset, leave-one-out split in time order, seed and columns. Each model runs in its own process
(a crash or an out-of-memory kill fails that row only, and its peak memory is its own); its
result is kept in ``OUT/runs/<model>.json`` with a hash of everything that defines the run, so a
rerun with the same OUT skips finished models. LLMGen reranks the candidates of the run's best
candidate source by ``valid_metric``, a classic model or the text retriever (a row of its own,
``TextRetriever``), unless ``candidate_source`` is given. Each model's per-user test metrics go to
``OUT/runs/<model>.users.csv``; the table gives bootstrap intervals over users and, per LLMGen
row, the paired interval of its difference to that candidate source (:mod:`recbole_llmgen.per_user`). Writes ``OUT/benchmark.csv``, ``OUT/benchmark.md`` and
``OUT/benchmark.png``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable

import numpy as np

from recbole_llmgen import per_user, progress
from recbole_llmgen.llm import describe_machine
from recbole_llmgen.regime import REGIME_KEYS, Regime, RegimeUnavailable, check_targets, selected_users
from recbole_llmgen.regime import prepare as prepare_regime

DEFAULT_MODELS = ("Pop", "BPR", "SASRec", "LLMGen")
PROTOCOLS = ("full", "uni19", "uni100")
# Defaults (the default run fits in ~8 minutes on 2 CPU cores); any --key=value wins. Cheap models
# train until validation stops improving (RecBole's early stopping: `stopping_step` epochs without a
# better valid_metric, `epochs` a cap they do not reach); expensive sequential ones are capped (on 2
# cores a SASRec epoch over ml-100k's ~99k training sequences takes ~100 s) and labelled so.
MODEL_DEFAULTS = {
    "BPR": {"epochs": 300, "stopping_step": 10},
    "SASRec": {"epochs": 3, "stopping_step": 2, "train_neg_sample_args": None},
    "GRU4Rec": {"epochs": 3, "stopping_step": 2, "train_neg_sample_args": None},
    "LLMGen": {"num_candidates": 10, "max_history_items": 5},
}
TABLE_METRICS = ("ndcg@10", "hit@10", "mrr@10", "recall@10")
# The text retriever as a row of its own (LLMGen's `candidate_source: text` ranking, the LLM's weight
# 0: sentence-encoder similarity of each item's text to the history, no LLM): a baseline, and a
# candidate source LLMGen's default is chosen from on the valid split, beside the classic models.
TEXT_RETRIEVER = "TextRetriever"
TEXT_RETRIEVER_CONFIG = {
    "candidate_source": "text",
    "score_fusion": 0.0,
    "train_mode": "none",
    "score_method": "likelihood",
}


def split_args(protocol: str) -> dict:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: {protocol!r} is not allowed; choose one of {', '.join(PROTOCOLS)}")
    return {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": protocol}


def file_settings(path: str, model: str) -> dict:
    """What a config file sets for ``model``: its top-level keys, then its own section (a section
    for another model is not its business: changing it does not rerun this model)."""
    import yaml

    from recbole_llmgen.registry import model_sections

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    sections = model_sections(data)
    return {**{k: v for k, v in data.items() if k not in sections}, **sections.get(model, {})}


def file_keys(config_files: list[str] | None, model: str) -> set[str]:
    """Keys the config files set for ``model``."""
    return {key for path in config_files or [] for key in file_settings(path, model)}


def model_config(
    model: str, dataset: str, protocol: str, overrides: dict, out: str, config_files: list[str] | None = None
) -> dict:
    """The config dict of one model: laptop defaults (those the config files set for it left out:
    a config dict would beat the files), then the user's overrides, then the shared split and output
    folder (the same for every model, never overridden per model)."""
    from recbole_llmgen.integration import every_column_unless_set, llmgen_only_keys, with_data_path

    if model != "LLMGen":  # LLMGen's own keys mean nothing to other models: keep them out of their hash
        own_keys = llmgen_only_keys()
        overrides = {k: v for k, v in overrides.items() if k not in own_keys}
    from_files = file_keys(config_files, model)
    defaults = {k: v for k, v in MODEL_DEFAULTS.get(model, {}).items() if k not in from_files}
    config = {**defaults, **overrides}
    config["eval_args"] = split_args(protocol)
    config["checkpoint_dir"] = os.path.join(out, "saved")
    return every_column_unless_set(dataset, with_data_path(config, config_files))


def row_model(spec: dict) -> str:
    """The name a run's row goes by: its own (``TextRetriever``) or its RecBole model's."""
    return spec.get("name", spec["model"])


def run_hash(spec: dict) -> str:
    """Everything that defines a run: model, dataset, config dict, config files' text, candidates."""
    # a file that sets nothing for this model (a section for another one) is no part of its run
    files = [s for s in (file_settings(path, spec["model"]) for path in spec.get("config_files") or []) if s]
    candidate = spec["config"].get("candidate_source")
    stamp = None
    if isinstance(candidate, str) and os.path.isfile(candidate):
        stat = os.stat(candidate)
        stamp = [stat.st_size, int(stat.st_mtime)]
    parts = [spec["model"], spec["dataset"], spec["config"], files, stamp, spec.get("llm_valid", False)]
    if spec.get("name"):  # a row of its own built from another model (the text retriever)
        parts.append(spec["name"])
    if spec.get("eval_users"):  # another sample of users is another run (its rows are never reused)
        parts.append(spec["eval_users"])
    if spec.get("nproc", 1) > 1:  # same metrics, other times: a rerun with another nproc is a new row
        parts.append(spec["nproc"])
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _number(value):
    if value is None or not math.isfinite(float(value)):
        return None
    return round(float(value), 4)


def llm_only_variant(spec: dict, trainer, model, test_data, scores) -> list[dict]:
    """A fused LLMGen's candidates ranked by the LLM alone (weight 1) on the test split: the row
    that says what fusion added. The model's own weight is restored whatever happens."""
    weight = model.fusion_weight
    model.fusion_weight = 1.0
    try:
        start = time.perf_counter()
        with keep_struct(trainer) as kept_alone:
            alone = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
        alone_seconds = time.perf_counter() - start
    finally:
        model.fusion_weight = weight
    if spec.get("users_file") and _is_writer():
        values = per_user.per_user_values(kept_alone["struct"], trainer.evaluator, trainer.config["topk"])
        users, targets = per_user.users_in_order(test_data)
        per_user.write_users(variant_users_file(spec["users_file"]), users, "test", values, targets)
    valid_alone = best_fusion_results(trainer, scores).get(1.0) or {}
    return [
        {
            "variant": "LLM only",
            **{f"valid_{k}": _number(v) for k, v in valid_alone.items()},
            **{f"test_{k}": _number(v) for k, v in alone.items()},
            "eval_seconds": round(alone_seconds, 1),
            "fusion_weight": 1.0,
        }
    ]


def run_one(spec: dict) -> dict:
    """Train and evaluate one model in this process; returns its result row."""
    import resource

    import torch
    from recbole.utils import get_trainer, init_logger

    import recbole_llmgen  # noqa: F401
    from recbole_llmgen.integration import build_config, build_model, load_data, only_users, recbole_argv

    with recbole_argv([]):
        config = build_config(spec["model"], spec["dataset"], spec["config"], spec.get("config_files"))
    init_logger(config)  # RecBole's epoch lines go to this model's log
    train_data, valid_data, test_data = load_data(config)
    if spec.get("eval_users"):  # a seeded sample of users: evaluated on both splits, trained on all data
        valid_data, test_data = only_users(valid_data, spec["eval_users"]), only_users(test_data, spec["eval_users"])
    model = build_model(config, train_data)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    # a zero-shot LLM selects nothing on the valid split: skipping it halves its cost (opt in: llm_valid)
    settings = getattr(model, "settings", None)  # LLMGen's; None for a classic model
    fused = settings is not None and settings.score_fusion != "none"
    zero_shot = (
        settings is not None
        and settings.train_mode == "none"
        and not fused  # auto chooses its weight there
        and settings.length_penalty != "auto"  # and auto its length penalty
        and not spec.get("llm_valid", False)
    )
    start = time.perf_counter()
    scores: list[tuple[int, float]] = []  # (epoch, valid score) of every validation
    epochs = progress.tracker(f"{spec['model']}: training", int(config["epochs"] or 0), "epochs at most")

    def validated(epoch: int, score: float) -> None:
        scores.append((epoch, float(score)))
        if epochs is not None:
            epochs.advance(epoch + 1 - epochs.done, note=f"valid {config['valid_metric']} {float(score):.4f}")

    best_valid_score, best_valid = trainer.fit(
        train_data, None if zero_shot else valid_data, saved=True, show_progress=False, callback_fn=validated
    )
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores_kept = model.cached() if fused else contextlib.nullcontext()
    with scores_kept:  # fused, then LLM only: the LLM scores each test user once
        with keep_struct(trainer) as kept:
            test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
        eval_seconds = time.perf_counter() - start
        variants = llm_only_variant(spec, trainer, model, test_data, scores) if fused and not spec.get("name") else []
    if spec.get("users_file") and _is_writer():
        values = per_user.per_user_values(kept["struct"], trainer.evaluator, config["topk"])
        users, targets = per_user.users_in_order(test_data)
        per_user.write_users(spec["users_file"], users, "test", values, targets)
    frozen = sum(p.numel() for p in model.llm.parameters() if not p.requires_grad) if hasattr(model, "llm") else 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "model": row_model(spec),
        "status": "ok",
        "variant": "fused" if fused and not spec.get("name") else "",
        "fusion_weight": model.fusion_weight if fused else None,
        **length_penalty_fields(spec, config, model),
        "variants": variants,
        "candidate_source": config["candidate_source"] if spec["model"] == "LLMGen" else "",
        "score_method": config["score_method"] if spec["model"] == "LLMGen" else "",
        "num_candidates": config["num_candidates"] if spec["model"] == "LLMGen" else None,
        "valid_metric": config["valid_metric"],
        "best_valid_score": _number(best_valid_score),
        **{f"valid_{k}": _number(v) for k, v in (best_valid or {}).items()},
        **{f"test_{k}": _number(v) for k, v in test.items()},
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "trainable_parameters": int(trainable),
        "total_parameters": int(trainable + frozen),
        "model_file": trainer.saved_model_file if os.path.isfile(trainer.saved_model_file) else "",
        "torch_threads": torch.get_num_threads(),
        "machine": describe_machine(config["device"]),
        "llm_dtype": str(model.llm.dtype).removeprefix("torch.") if hasattr(model, "llm") else "",
        "processes": int(spec.get("nproc", 1)),
        **training_record(trainer, config, scores),
        "valid_curve": valid_curve(trainer, scores),
    }


def length_penalty_fields(spec, config, model) -> dict:
    """The length penalty an LLMGen row ranked by (likelihood and generate), and whether the valid
    split chose it (``length_penalty: auto``)."""
    if spec["model"] != "LLMGen" or config["score_method"] == "verbalizer":
        return {}
    return {"length_penalty": model.length_penalty, "length_penalty_auto": config["length_penalty"] == "auto"}


def variant_users_file(users_file: str) -> str:
    """Per-user file of the LLM-only ranking of a fused LLMGen run."""
    return users_file.removesuffix(per_user.SUFFIX) + ".llm-only" + per_user.SUFFIX


def best_fusion_results(trainer, scores: list[tuple[int, float]]) -> dict:
    """``{weight: valid result}`` of the validation whose checkpoint was kept (the last best)."""
    history = getattr(trainer, "fusion_history", None) or []
    if not history or len(history) != len(scores):
        return history[-1] if history else {}
    return history[best_validation(trainer, scores)]


def best_validation(trainer, scores: list[tuple[int, float]]) -> int:
    """Index in ``scores`` of the validation whose checkpoint RecBole kept (its `>=`: the last tie)."""
    bigger = getattr(trainer, "valid_metric_bigger", True)
    target = (max if bigger else min)(score for _, score in scores)
    return [i for i, (_, score) in enumerate(scores) if score == target][-1]


def training_record(trainer, config, scores: list[tuple[int, float]]) -> dict:
    """How a model was trained: epochs run, the cap, the best validation epoch, and whether
    training ended by early stopping (``validation``), by reaching the cap (``cap``: possibly
    underfit), in RecBole's single pass of a traditional model (``one pass``: Pop, ItemKNN...) or
    trained nothing (``none``: zero-shot, or a resumed run already at its cap)."""
    from recbole.utils import ModelType

    epochs = len(getattr(trainer, "train_loss_dict", None) or {})
    cap = int(getattr(trainer, "epochs", None) or config["epochs"])  # RecBole's TraditionalTrainer forces 1
    best = None
    if scores:
        best = scores[best_validation(trainer, scores)][0]
    if epochs == 0:
        stopped = "none"
    elif config["MODEL_TYPE"] == ModelType.TRADITIONAL:
        stopped = "one pass"  # Pop, ItemKNN, EASE...: fitted in one pass over the data, nothing to stop
    else:
        stopped = "validation" if scores and epochs < cap else "cap"
    return {"epochs_trained": epochs, "epoch_cap": cap, "best_epoch": best, "stopped_by": stopped}


def valid_curve(trainer, scores: list[tuple[int, float]]) -> list[dict]:
    """The learning curve: per validation, its epoch, the epoch's training loss (RecBole's: summed
    over its optimizer steps) and the ``valid_metric`` as validated; with ``score_fusion: auto``
    also the weight chosen then and NDCG@10 of the fused ranking and of the LLM alone (weight 1.0)
    on the same users; with ``length_penalty: auto`` the penalty chosen then."""
    history = getattr(trainer, "fusion_history", None) or []
    weights = getattr(trainer, "fusion_weights", None) or []
    penalties = getattr(trainer, "length_penalties", None) or []
    losses = getattr(trainer, "train_loss_dict", None) or {}
    curve = []
    for i, (epoch, score) in enumerate(scores):
        point = {"epoch": epoch, "valid": _number(score), "train_loss": _number(losses.get(epoch))}
        if len(history) == len(scores) and len(weights) == len(scores):
            point["fusion_weight"] = weights[i]
            point["fused_ndcg@10"] = _number((history[i].get(weights[i]) or {}).get("ndcg@10"))
            point["llm_alone_ndcg@10"] = _number((history[i].get(1.0) or {}).get("ndcg@10"))
        if len(penalties) == len(scores):
            point["length_penalty"] = penalties[i]
        curve.append(point)
    return curve


@contextlib.contextmanager
def keep_struct(trainer):
    """Keeps the data struct RecBole's evaluator is given (per-user top-k positions) in ``kept``."""
    kept = {}
    evaluate = trainer.evaluator.evaluate

    def keeping(struct):
        kept["struct"] = struct
        return evaluate(struct)

    trainer.evaluator.evaluate = keeping
    try:
        yield kept
    finally:
        del trainer.evaluator.evaluate  # the class's method again


def _is_writer() -> bool:
    """One process writes files: the only one, or rank 0 of a multi-process run."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def run_safely(spec: dict) -> dict:
    """:func:`run_one`, with an exception turned into a failed row (the traceback is printed)."""
    try:
        return run_one(spec)
    except Exception as error:  # noqa: BLE001 -- a failed model is a row of the table
        traceback.print_exc()
        return {
            "model": row_model(spec),
            "status": "failed",
            "error": f"{type(error).__name__}: {error}",
        }


def run_in_process(spec: dict, log_path: str) -> dict:
    """Runner without a subprocess (tests, debugging): same rows, shared memory peak."""
    return run_safely(spec)


def _worker(spec_path: str, result_path: str) -> None:
    from recbole_llmgen.distributed import exit_with_parent

    exit_with_parent()  # a killed benchmark leaves no model running
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    nproc = int(spec.get("nproc", 1))
    if nproc > 1:
        import torch.multiprocessing as mp

        from recbole_llmgen.distributed import free_port

        try:  # rank 0 writes the row
            mp.spawn(_rank_worker, args=(spec, result_path, free_port()), nprocs=nproc, join=True)
            return
        except Exception as error:  # noqa: BLE001 -- a failed rank (the others were stopped) is a failed row
            traceback.print_exc()
            last = error_line(error)
            row = {"model": row_model(spec), "status": "failed", "error": f"{nproc} processes: {last}"}
    else:
        row = run_safely(spec)
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(row, f)


def error_line(error: BaseException) -> str:
    """The last line of an error's text, or its type's name when it has no text."""
    return (str(error).strip().splitlines() or [type(error).__name__])[-1]


def _rank_worker(local_rank: int, spec: dict, result_path: str, port: str) -> None:
    """One of ``spec['nproc']`` processes (same metrics as one, see ``distributed``); rank 0 writes."""
    from recbole_llmgen.distributed import exit_with_parent, rank_config, share_cpus

    exit_with_parent()
    nproc = int(spec["nproc"])
    share_cpus(nproc)
    row = run_one({**spec, "config": rank_config(spec["config"], local_rank, nproc, port)})
    if local_rank == 0:
        with open(result_path, "w", encoding="utf-8") as f:
            json.dump(row, f)


def named(console: Callable[[str], None], spec: dict) -> Callable[[str], None]:
    """The console of a row built from another model: its stages go by the row's name (the text
    retriever's evaluation says ``TextRetriever: evaluating``, not ``LLMGen: evaluating``)."""
    name, model = row_model(spec), spec["model"]
    if name == model:
        return console
    return lambda text: console(text.replace(f"{model}:", f"{name}:", 1))


def run_in_subprocess(spec: dict, log_path: str, console: Callable[[str], None] | None = None) -> dict:
    """Run one model in a fresh Python process; a crash becomes a failed row. Its output goes to
    ``log_path``; with ``console``, its progress (:mod:`recbole_llmgen.progress`) is printed there."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
        progress_path = os.path.join(tmp, "progress.json")
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        code = f"from recbole_llmgen.benchmark import _worker; _worker({spec_path!r}, {result_path!r})"
        env = {**os.environ, progress.ENV: progress_path}
        with open(log_path, "w", encoding="utf-8") as log:
            process = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=env)
            returncode = progress.watch(process, progress_path, named(console or (lambda _: None), spec))
        if os.path.isfile(result_path):
            with open(result_path, encoding="utf-8") as f:
                return json.load(f)
        return {
            "model": row_model(spec),
            "status": "failed",
            "error": f"process exited with {returncode}; see {log_path}",
        }


def expand(row: dict) -> list[dict]:
    """A run's row, then a row per variant (a fused LLMGen's LLM-only ranking), sharing its training."""
    variants = row.get("variants") or []
    shared = {k: v for k, v in row.items() if not k.startswith(("valid_", "test_")) and k != "variants"}
    return [{k: v for k, v in row.items() if k != "variants"}] + [{**shared, **variant} for variant in variants]


def row_name(row: dict) -> str:
    """The model, plus the variant when one run gives several rows ("LLMGen", "LLMGen LLM only")."""
    return f"{row['model']} {row['variant']}" if row.get("variant") and row["variant"] != "fused" else row["model"]


def best_classic(rows: list[dict]) -> dict | None:
    """The classic model with the best validation score (one with a model file)."""
    done = [r for r in rows if r["model"] not in ("LLMGen", TEXT_RETRIEVER) and r.get("status") == "ok"]
    done = [r for r in done if r.get("model_file")]
    return max(done, key=lambda r: r.get("best_valid_score") or float("-inf")) if done else None


def best_candidate(rows: list[dict]) -> dict | None:
    """LLMGen's default candidate source: the classic model or the text retriever with the best
    validation score (a tie goes to the classic model: it comes first)."""
    done = [r for r in rows if r["model"] == TEXT_RETRIEVER and r.get("status") == "ok"]
    done = [r for r in (best_classic(rows), *done) if r is not None and r.get("best_valid_score") is not None]
    return max(done, key=lambda r: r["best_valid_score"]) if done else best_classic(rows)


def candidate_source_of(row: dict) -> str:
    """The ``candidate_source`` value that reranks ``row``'s ranking."""
    return TEXT_RETRIEVER_CONFIG["candidate_source"] if row["model"] == TEXT_RETRIEVER else row["model_file"]


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
    """
    from recbole_llmgen.registry import known_model_names

    overrides = dict(overrides or {})
    split_args(protocol)
    for key, meaning in (("epochs", "the epoch cap"), ("stopping_step", "epochs without improvement before stopping")):
        value = overrides.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key}: expected an integer >= 1 ({meaning}), got {value!r}")
    if isinstance(llm_nproc, bool) or not isinstance(llm_nproc, int) or llm_nproc < 1:
        raise ValueError(f"llm_nproc: expected a number of processes >= 1, got {llm_nproc!r}")
    known = {*known_model_names(), TEXT_RETRIEVER}
    unknown = [m for m in models if m not in known]
    if unknown:
        raise ValueError(f"models: {unknown} are not RecBole or plugin models; e.g. {', '.join(DEFAULT_MODELS)}")
    for path in config_files or []:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config_files: {path!r} does not exist")
    regime = regime or Regime()
    if "eval_users" in overrides:  # the config key (--eval_users=N) means the same as the option
        eval_users = overrides.pop("eval_users")
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    data_path, users = regime_data(regime, dataset, overrides, config_files, out)
    sample = None
    if eval_users is not None:
        sample = sample_users(users, eval_users, int(overrides.get("seed", DEFAULT_SEED)), log)
        if sample is not None:
            users = users[users.index.astype(str).isin(sample["users"])]
    choose_candidates = "LLMGen" in models and "candidate_source" not in {
        *overrides,
        *file_keys(config_files, "LLMGen"),
    }
    retriever = [TEXT_RETRIEVER] if choose_candidates or TEXT_RETRIEVER in models else []
    ordered = [m for m in models if m not in ("LLMGen", TEXT_RETRIEVER)] + retriever
    ordered += [m for m in models if m == "LLMGen"]
    if requests and ("LLMGen" not in ordered or len(ordered) < 2):
        raise ValueError("requests: the request protocol needs LLMGen and a classic model in models")
    rows: list[dict] = []
    specs: dict[str, dict] = {}
    for index, model in enumerate(ordered, 1):
        recbole_model = "LLMGen" if model == TEXT_RETRIEVER else model
        config = model_config(recbole_model, dataset, protocol, overrides, out, config_files)
        if data_path is not None:  # the regime's copy of the data, for every model
            config["data_path"] = data_path
        if model == TEXT_RETRIEVER:
            config.update(TEXT_RETRIEVER_CONFIG)
        if model == "LLMGen" and choose_candidates:
            # the request protocol compares with the best classic model, reranking its candidates
            best = best_classic(rows) if requests else best_candidate(rows)
            if best is not None:
                config["candidate_source"] = candidate_source_of(best)
        spec = {"model": recbole_model, "dataset": dataset, "config": config, "config_files": config_files}
        if model != recbole_model:
            spec["name"] = model
        spec["users_file"] = os.path.abspath(per_user.users_file(os.path.join(out, "runs", model)))
        if sample is not None:
            spec["eval_users"] = sample["users"]
            spec["eval_users_of"], spec["eval_users_seed"] = sample["of"], sample["seed"]
        if model == "LLMGen" and llm_valid:
            spec["llm_valid"] = True
        if model == "LLMGen" and llm_nproc > 1:
            spec["nproc"] = llm_nproc
        digest = run_hash(spec)
        specs[model] = spec
        record = os.path.join(out, "runs", f"{model}.json")
        previous = _read(record)
        if (
            previous
            and previous.get("hash") == digest
            and previous.get("status") == "ok"
            and os.path.isfile(spec["users_file"])  # a row from before per-user files runs again
        ):
            log(f"[{index}/{len(ordered)}] {model}: finished before with the same config, reused")
            rows.extend(expand(previous))
            continue
        log(f"[{index}/{len(ordered)}] {model}: running (log: {os.path.join(out, 'runs', model + '.log')})")
        start = time.perf_counter()
        row = (
            runner(spec, os.path.join(out, "runs", f"{model}.log"), console=log)
            if runner is run_in_subprocess  # the default: its progress on the console
            else runner(spec, os.path.join(out, "runs", f"{model}.log"))
        )
        row["hash"] = digest
        row["wall_seconds"] = round(time.perf_counter() - start, 1)
        _write_json(record, row)
        rows.extend(expand(row))
        if row.get("status") == "ok":
            log(
                f"    test ndcg@10 {row.get('test_ndcg@10')}, hit@10 {row.get('test_hit@10')} ({row['wall_seconds']} s)"
            )
        else:
            log(f"    FAILED: {row.get('error')}")
    meta = {"dataset": dataset, "protocol": protocol, "overrides": overrides, "regime": regime, "users": users}
    meta["sample"] = sample
    write_outputs(rows, out, meta)
    if requests:
        run_requests(rows, specs.get("LLMGen"), out, log)
    return rows


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
    previous = _read(record)
    if previous and previous.get("hash") == digest and os.path.isfile(os.path.join(out, "requests.md")):
        log("requests: finished before with the same LLMGen run, reused")
        return
    log("requests: the request protocol (valid: weight; test: rows)")
    start = time.perf_counter()
    request_rows = run_request_protocol(spec, out, best["model"])
    _write_json(record, {"hash": digest, "rows": request_rows, "wall_seconds": round(time.perf_counter() - start, 1)})
    log(f"    wrote {os.path.join(out, 'requests.md')} ({time.perf_counter() - start:.0f} s)")


DEFAULT_SEED = 2020  # RecBole's default seed: the sample's unless the run sets seed


def sample_users(users, eval_users, seed: int, log: Callable[[str], None] = print) -> dict | None:
    """``{"users": [...], "of": M, "seed": S}``: a seeded sample of ``eval_users`` of the ``users``
    table's users (a regime's evaluated users), sorted; None when it asks for all of them (a warning
    when more). The same table and seed give the same users for every model and every sweep cell."""
    if isinstance(eval_users, bool) or not isinstance(eval_users, int) or eval_users < 1:
        raise ValueError(f"eval_users: expected a number of test users >= 1, got {eval_users!r}")
    if users is None:
        raise ValueError(
            "eval_users: the benchmark could not read this dataset's atomic .inter file to list its test users "
            "(set data_path to the folder that holds DATASET/DATASET.inter)"
        )
    if len(users) == 0:
        raise ValueError("eval_users: this regime evaluates no user, so there is nobody to sample")
    if eval_users >= len(users):
        if eval_users > len(users):
            log(f"    eval_users: {eval_users} is more than the {len(users)} test users; evaluating all of them")
        return None
    chosen = np.random.default_rng(seed).choice(len(users), size=eval_users, replace=False)
    tokens = sorted(str(u) for u in users.index[np.sort(chosen)])
    return {"users": tokens, "of": len(users), "seed": seed}


def regime_data(regime: Regime, dataset: str, overrides: dict, config_files: list[str] | None, out: str):
    """``(data_path, users)``: the regime's copy of the data (None: the user's own) and its per-user
    table (training interactions, test target) restricted to the users it evaluates. The dataset's
    folder, columns and seed are read from RecBole's Config, as every model of the run reads them.
    A default regime on a dataset without atomic files under data_path gives no table (None)."""
    from recbole_llmgen.integration import build_config, recbole_argv

    with recbole_argv([]):
        config = build_config("Pop", dataset, model_config("Pop", dataset, "full", overrides, out, config_files),
                              config_files)  # fmt: skip
    try:
        data_path, table = prepare_regime(regime, config, out)
    except (FileNotFoundError, RegimeUnavailable):
        if not regime.is_default:
            raise
        return None, None  # the plain benchmark never needed the file itself; any other error is raised
    return data_path, table.loc[selected_users(regime, table)]


def _read(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: str, value) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def how_llmgen_ranks(row: dict) -> str:
    """What an LLMGen row did, truthfully: generated from the catalogue or reranked a candidate list."""
    source = str(row["candidate_source"])
    name = {"pop": "Pop", "text": "the text retriever"}.get(source, os.path.basename(source).split("-")[0])
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


def add_intervals(rows: list[dict], out: str, meta: dict | None = None) -> None:
    """Per row: users evaluated and 95% bootstrap intervals of test NDCG@10 / Hit@10; per LLMGen
    row: the paired interval of its difference to the best classic model (by validation, as for
    its candidates). Every model of the run must have evaluated the same users on the same targets.
    A regime that selects users (cold users or items): each row's test metrics become the means over
    those users (the per-user values RecBole's figures average)."""
    meta = meta or {}
    regime, users = meta.get("regime") or Regime(), meta.get("users")
    frames = {}
    for row in rows:
        path = os.path.abspath(per_user.users_file(os.path.join(out, "runs", row["model"])))
        if row.get("variant") == "LLM only":
            path = variant_users_file(path)
        if row.get("status") == "ok" and os.path.isfile(path):
            frames[row_name(row)] = per_user.read_users(path)
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
                row[f"test_{metric}"] = _number(frame[metric].mean())
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
    return f"{row['epochs_trained']}{best} / {row['stopped_by']} (cap {row['epoch_cap']})"


def _interval(row: dict, key: str) -> str:
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    return "-" if low is None or high is None else f"[{low:.4f}, {high:.4f}]"


def _difference(row: dict, metric: str) -> str:
    if row.get(f"diff_{metric}") is None:
        return "-"
    low, high = row[f"diff_{metric}_low"], row[f"diff_{metric}_high"]
    mark = " *" if low > 0 or high < 0 else ""
    return f"{row[f'diff_{metric}']:+.4f} [{low:+.4f}, {high:+.4f}] vs {row['compared_to']}{mark}"


def write_outputs(rows: list[dict], out: str, meta: dict) -> None:
    import pandas as pd

    add_intervals(rows, out, meta)
    frame = pd.DataFrame(rows)
    frame.insert(0, "label", [row_label(r) for r in rows])
    regime = meta.get("regime") or Regime()
    for key in REGIME_KEYS:
        frame[key] = getattr(regime, key)
    frame.to_csv(os.path.join(out, "benchmark.csv"), index=False)
    with open(os.path.join(out, "benchmark.md"), "w", encoding="utf-8") as f:
        f.write(markdown_table(rows, meta))
    plot(rows, os.path.join(out, "benchmark.png"), meta)
    plot_curves(rows, os.path.join(out, "learning_curve.png"))


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
        f"(the same resampled users for both); * = the interval excludes 0.\n\n{regime_line(meta)}{machine_line(rows)}"
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


def plot(rows: list[dict], path: str, meta: dict) -> None:
    """Quality (test NDCG@10, Hit@10) and cost (seconds, peak memory) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [textwrap.fill(row_label(r), 18) for r in rows]  # long labels on several lines, not across the plot
    ok = [r.get("status") == "ok" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.5))
    positions = range(len(rows))
    width = 0.4
    for shift, metric in ((-width / 2, "test_ndcg@10"), (width / 2, "test_hit@10")):
        values = [r.get(metric) or 0.0 for r in rows]
        errors = [
            [max(0.0, v - r.get(f"{metric}_low", v)) for v, r in zip(values, rows)],
            [max(0.0, r.get(f"{metric}_high", v) - v) for v, r in zip(values, rows)],
        ]  # 95% bootstrap intervals (0 where a row has none)
        bars = axes[0].bar(
            [p + shift for p in positions], values, width, yerr=errors, capsize=3, label=metric.replace("test_", "")
        )
        axes[0].bar_label(bars, fmt="%.3f", fontsize=7)
    axes[0].set_title(f"Quality (test, {meta['protocol']}; 95% intervals)")
    axes[0].legend()
    seconds = [(r.get("train_seconds") or 0.0) + (r.get("eval_seconds") or 0.0) for r in rows]
    bars = axes[1].bar(positions, seconds, color="tab:orange")
    axes[1].bar_label(bars, fmt="%.0f s", fontsize=7)
    axes[1].set_title("Cost: train + test seconds")
    memory = [r.get("peak_memory_mb") or 0.0 for r in rows]
    bars = axes[2].bar(positions, memory, color="tab:green")
    axes[2].bar_label(bars, fmt="%.0f MB", fontsize=7)
    axes[2].set_title("Cost: peak memory (MB)")
    for ax in axes:
        ax.set_xticks(list(positions))
        ax.set_xticklabels(
            [lab if good else f"{lab}\n(failed)" for lab, good in zip(labels, ok)], rotation=0, fontsize=7
        )
    fig.suptitle(f"recbole-llmgen benchmark: {meta['dataset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(rows: list[dict], path: str) -> None:
    """Valid metric per epoch of every LLMGen row that validated after training (fused and LLM
    alone), the kept epoch marked; nothing when no row has such a curve."""
    curves = [r for r in rows if r.get("model") == "LLMGen" and r.get("epochs_trained") and r.get("valid_curve")]
    if not curves:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    metric = "valid " + str(curves[0].get("valid_metric", ""))
    for row in curves:
        points = row["valid_curve"]
        epochs = [p["epoch"] + 1 for p in points]  # RecBole counts epochs from 0
        if all(p.get("fused_ndcg@10") is not None for p in points):
            metric = "valid NDCG@10"
            fused = [p["fused_ndcg@10"] for p in points]
            ax.plot(epochs, fused, marker="o", label="LLMGen fused (LLM weight chosen on valid each epoch)")
            for x, y, p in zip(epochs, fused, points):
                ax.annotate(f"w={p['fusion_weight']}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7)
            ax.plot(
                epochs, [p["llm_alone_ndcg@10"] for p in points], marker="s", linestyle="--", label="LLMGen, LLM alone"
            )
        else:
            ax.plot(epochs, [p["valid"] for p in points], marker="o", label=textwrap.shorten(row_label(row), 48))
        if row.get("best_epoch") is not None:
            ax.axvline(row["best_epoch"] + 1, color="grey", linestyle=":", label=f"kept: epoch {row['best_epoch'] + 1}")
    if metric == "valid NDCG@10":  # the other rows, for scale
        for other in rows:
            if other.get("model") != "LLMGen" and other.get("valid_ndcg@10") is not None:
                ax.axhline(other["valid_ndcg@10"], linewidth=0.8, alpha=0.6, color="black", linestyle="-.")
                ax.annotate(other["model"], (1, other["valid_ndcg@10"]), fontsize=7, xytext=(0, 2),
                            textcoords="offset points")  # fmt: skip
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title("LLMGen learning curve (valid split)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
