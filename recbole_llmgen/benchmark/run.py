"""One row: a model trained and evaluated through RecBole in its own process (or several, for a
multi-process LLMGen), its per-user test metrics written beside it, a crash turned into a failed row.

:func:`run_one` is the whole story of a row: RecBole's Config, data and trainer; ``fit`` with early
stopping on the valid split; ``evaluate`` on the test split with the kept checkpoint; what training
did (epochs, the best one, what stopped it) and what it cost. :func:`run_in_subprocess` is the
default runner (a crash or an out-of-memory kill fails that row only, and its peak memory is its own).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

from recbole_llmgen import feedback, per_user, progress
from recbole_llmgen.benchmark.cache import read_record, write_record
from recbole_llmgen.benchmark.plan import row_model
from recbole_llmgen.llm import describe_machine


def rounded(value):
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
            **{f"valid_{k}": rounded(v) for k, v in valid_alone.items()},
            **{f"test_{k}": rounded(v) for k, v in alone.items()},
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
    earlier = resume(spec, trainer, scores)  # an interrupted run of this row goes on from its last checkpoint
    epochs = progress.tracker(f"{spec['model']}: training", int(config["epochs"] or 0), "epochs at most")
    if epochs is not None and trainer.start_epoch:
        epochs.advance(trainer.start_epoch, note=f"resumed from {trainer.saved_model_file}")

    def validated(epoch: int, score: float) -> None:
        scores.append((epoch, float(score)))
        if epochs is not None:
            epochs.advance(epoch + 1 - epochs.done, note=f"valid {config['valid_metric']} {float(score):.4f}")
        save_progress(spec, trainer, scores, earlier.get("train_seconds", 0.0) + time.perf_counter() - start)

    best_valid_score, best_valid = trainer.fit(
        train_data, None if zero_shot else valid_data, saved=True, show_progress=False, callback_fn=validated
    )
    train_seconds = earlier.get("train_seconds", 0.0) + time.perf_counter() - start
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
        "item_id_format": config["item_id_format"] if spec["model"] == "LLMGen" else "",
        "num_candidates": config["num_candidates"] if spec["model"] == "LLMGen" else None,
        "valid_metric": config["valid_metric"],
        "seen_items": config["seen_items"],
        "best_valid_score": rounded(best_valid_score),
        **{f"valid_{k}": rounded(v) for k, v in (best_valid or {}).items()},
        **{f"test_{k}": rounded(v) for k, v in test.items()},
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
        **getattr(train_data.dataset, feedback.USED, {}),  # what --feedback added to the training split
        **training_record(trainer, config, scores),
        "resumed_from_epoch": earlier.get("epoch"),  # None: trained in one go
        "valid_curve": valid_curve(trainer, scores),
    }


def length_penalty_fields(spec, config, model) -> dict:
    """The length penalty an LLMGen row ranked by (likelihood and generate), and whether the valid
    split chose it (``length_penalty: auto``)."""
    if spec["model"] != "LLMGen" or config["score_method"] == "verbalizer":
        return {}
    return {"length_penalty": model.length_penalty, "length_penalty_auto": config["length_penalty"] == "auto"}


# --- an interrupted row goes on where it stopped: after every validation the row's progress file
# names the checkpoint RecBole kept (the best so far) and what a resumed run cannot recompute (the
# validations before, the trainer's auto choices, the losses, the training time so far)

HISTORIES = ("fusion_history", "length_penalty_history")  # per validation: {value: valid result}
CHOICES = ("fusion_weights", "length_penalties")  # per validation: the value chosen


def progress_file(spec: dict) -> str | None:
    users_file = spec.get("users_file")
    return users_file.removesuffix(per_user.SUFFIX) + ".progress.json" if users_file else None


def save_progress(spec: dict, trainer, scores: list[tuple[int, float]], train_seconds: float) -> None:
    """The row's progress after a validation (one writer; written whole, then renamed into place)."""
    path = progress_file(spec)
    if path is None or not _is_writer() or not os.path.isfile(trainer.saved_model_file):
        return
    best = scores[best_validation(trainer, scores)][0]
    state = {
        "hash": spec.get("hash"),
        "checkpoint": trainer.saved_model_file,
        "epoch": best,  # the checkpoint's epoch: training goes on after it
        "scores": [s for s in scores if s[0] <= best],
        "train_seconds": round(train_seconds, 1),
        "train_loss": {str(k): float(v) for k, v in trainer.train_loss_dict.items() if k <= best},
        **{
            k: [[[w, {m: float(v) for m, v in r.items()}] for w, r in h.items()] for h in getattr(trainer, k, [])]
            for k in HISTORIES
        },  # fmt: skip
        **{k: list(getattr(trainer, k, [])) for k in CHOICES},
    }
    for key in (*HISTORIES, *CHOICES):  # the entries up to the checkpoint's validation
        state[key] = state[key][: len(state["scores"])]
    write_record(path, state)


def resumable(spec: dict) -> dict | None:
    """The row's progress when it belongs to this very run (its hash) and its checkpoint is there."""
    path = progress_file(spec)
    state = read_record(path) if path else None
    if not state or state.get("hash") != spec.get("hash") or not os.path.isfile(state.get("checkpoint", "")):
        return None
    return state


def resume(spec: dict, trainer, scores: list[tuple[int, float]]) -> dict:
    """Go on from the row's progress file when it belongs to this very run (its hash) and its
    checkpoint is there: RecBole's ``resume_checkpoint`` (weights, optimizer, epoch, early-stopping
    state), the earlier validations into ``scores`` and the trainer. Returns the progress ({} when
    starting afresh)."""
    state = resumable(spec)
    if state is None:
        return {}
    trainer.resume_checkpoint(state["checkpoint"])
    scores.extend((int(e), float(v)) for e, v in state["scores"])
    trainer.train_loss_dict.update({int(k): v for k, v in state["train_loss"].items()})
    for key in HISTORIES:
        if hasattr(trainer, key):
            getattr(trainer, key).extend({float(w): r for w, r in h} for h in state[key])
    for key in CHOICES:
        if hasattr(trainer, key):
            getattr(trainer, key).extend(state[key])
    trainer.logger.info(f"resumed from {state['checkpoint']} (epoch {state['epoch']}, {progress_file(spec)})")
    return state


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
        point = {"epoch": epoch, "valid": rounded(score), "train_loss": rounded(losses.get(epoch))}
        if len(history) == len(scores) and len(weights) == len(scores):
            point["fusion_weight"] = weights[i]
            point["fused_ndcg@10"] = rounded((history[i].get(weights[i]) or {}).get("ndcg@10"))
            point["llm_alone_ndcg@10"] = rounded((history[i].get(1.0) or {}).get("ndcg@10"))
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
        code = f"from recbole_llmgen.benchmark.run import _worker; _worker({spec_path!r}, {result_path!r})"
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
