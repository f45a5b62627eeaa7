"""What a benchmark runs: the models, each model's config dict, the split, the users evaluated.

Every model runs through RecBole on the same dataset, leave-one-out split in time order, seed,
columns and ``seen_items`` rule (:mod:`recbole_llmgen.seen_items`); :func:`model_config` builds one
model's config dict from the laptop defaults below, the config files and the user's overrides.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from recbole_llmgen import per_user, seen_items
from recbole_llmgen.regime import Regime, RegimeUnavailable, selected_users
from recbole_llmgen.regime import prepare as prepare_regime

DEFAULT_MODELS = ("Pop", "BPR", "SASRec", "GRU4Rec", "LightGCN", "LLMGen")
PROTOCOLS = ("full", "uni19", "uni100")
# Defaults; any --key=value wins. Every trained classic model stops when validation stops improving
# (RecBole's early stopping: `stopping_step` validations without a better valid_metric; `epochs` is
# a cap none reaches on ml-100k). Settings chosen on the valid split only, by
# benchmarks/choose_classic.py (grids and valid results in docs/benchmark.md). The sequential
# models keep RecBole's CE loss (full softmax over the catalogue) and stop after 3 validations
# without a gain (an epoch of SASRec is ~1 min on 2 cores); the others use RecBole's 10.
SHARED_DEFAULTS = {"valid_metric": "NDCG@10"}  # every row stops early, and LLMGen's candidates are chosen, on it
MODEL_DEFAULTS = {
    "BPR": {"epochs": 300, "stopping_step": 10},
    "SASRec": {
        "epochs": 200,
        "stopping_step": 3,
        "train_neg_sample_args": None,  # RecBole's CE loss: a softmax over the whole catalogue
        "train_batch_size": 512,  # RecBole's 2048 costs as much an epoch and learns less in one
        "hidden_dropout_prob": 0.2,  # chosen on valid over 0.5 (RecBole's default)
        "attn_dropout_prob": 0.2,
    },
    "GRU4Rec": {"epochs": 200, "stopping_step": 3, "train_neg_sample_args": None},  # RecBole's settings otherwise
    "LightGCN": {"epochs": 500, "stopping_step": 10, "learning_rate": 0.01},  # chosen on valid over RecBole's 0.001
    "LLMGen": {"num_candidates": 10, "max_history_items": 5},
}
# RecBole's own mixed precision (`enable_amp`: autocast, bf16 on a CPU) for the classic models where
# the CPU computes bf16 natively (AMX, avx512_bf16) or on CUDA: SASRec's training step 1.67x faster
# on 2 Xeon cores with AMX (benchmarks/bench_classic_step.py; evaluation stays fp32).
AMP_MODELS = ("SASRec", "GRU4Rec")


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
    defaults = {**SHARED_DEFAULTS, **MODEL_DEFAULTS.get(model, {})}
    if model in AMP_MODELS and fast_bf16(overrides.get("device")):
        defaults["enable_amp"] = True
    defaults = {k: v for k, v in defaults.items() if k not in from_files}
    config = {**defaults, **overrides}
    config["eval_args"] = split_args(protocol)
    config["checkpoint_dir"] = os.path.join(out, "saved")
    return every_column_unless_set(dataset, with_data_path(config, config_files))


def fast_bf16(device=None) -> bool:
    """Whether the models run where bf16 is native: CUDA (when RecBole would use it) or such a CPU."""
    import torch

    from recbole_llmgen.llm import autocast_dtype

    kind = "cuda" if torch.cuda.is_available() and device != "cpu" else "cpu"
    return autocast_dtype(kind) is not None


def row_model(spec: dict) -> str:
    """The name a run's row goes by: its own (``TextRetriever``) or its RecBole model's."""
    return spec.get("name", spec["model"])


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


def data_config(dataset: str, overrides: dict, config_files, out: str):
    """RecBole's Config of the run's data (its folder, columns and seed, as every model reads them)."""
    from recbole_llmgen.integration import build_config, recbole_argv

    with recbole_argv([]):
        return build_config("Pop", dataset, model_config("Pop", dataset, "full", overrides, out, config_files),
                            config_files)  # fmt: skip


def regime_data(regime: Regime, dataset: str, overrides: dict, config_files: list[str] | None, out: str):
    """``(data_path, users)``: the regime's copy of the data (None: the user's own) and its per-user
    table (training interactions, test target) restricted to the users it evaluates. The dataset's
    folder, columns and seed are read from RecBole's Config, as every model of the run reads them.
    A default regime on a dataset without atomic files under data_path gives no table (None)."""
    try:
        data_path, table = prepare_regime(regime, data_config(dataset, overrides, config_files, out), out)
    except (FileNotFoundError, RegimeUnavailable):
        if not regime.is_default:
            raise
        return None, None  # the plain benchmark never needed the file itself; any other error is raised
    return data_path, table.loc[selected_users(regime, table)]


def data_folder(dataset: str, overrides: dict, config_files, out: str, data_path: str | None) -> str:
    """The folder RecBole reads the dataset's atomic files from (a regime's copy, or the Config's)."""
    if data_path is not None:
        return os.path.join(data_path, dataset)
    return data_config(dataset, overrides, config_files, out)["data_path"]


def llm_path_of(spec: dict) -> str:
    """The ``llm_path`` an LLMGen row loads: its config dict's, else its config files' (the last that
    sets it), else LLMGen's default."""
    import yaml

    from recbole_llmgen.integration import PROPERTIES

    if spec["config"].get("llm_path"):
        return spec["config"]["llm_path"]
    from_files = [file_settings(path, "LLMGen").get("llm_path") for path in spec.get("config_files") or []]
    from_files = [v for v in from_files if v]
    if from_files:
        return from_files[-1]
    with open(PROPERTIES, encoding="utf-8") as f:
        return yaml.safe_load(f)["llm_path"]


def check_arguments(models, protocol: str, config_files, overrides: dict | None, llm_nproc: int) -> dict:
    """The run's overrides (a copy, ``seen_items`` set: one rule for every row) once every argument
    is checked; a named error for the first that is not allowed."""
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
    # one rule for every row: the override, else the config files' top level (the last one that sets it)
    from_files = [file_settings(path, "").get(seen_items.KEY) for path in config_files or []]
    rule = overrides.get(seen_items.KEY, next((v for v in reversed(from_files) if v is not None), None))
    overrides[seen_items.KEY] = seen_items.check(rule)
    return overrides


def chooses_candidates(models, overrides: dict, config_files) -> bool:
    """Whether the run picks LLMGen's candidate source (nobody set ``candidate_source``)."""
    return "LLMGen" in models and "candidate_source" not in {*overrides, *file_keys(config_files, "LLMGen")}


def ordered_models(models, choose_candidates: bool, requests: bool) -> list[str]:
    """Classic models first, then the text retriever (a candidate source to choose from), then LLMGen."""
    retriever = [TEXT_RETRIEVER] if choose_candidates or TEXT_RETRIEVER in models else []
    ordered = [m for m in models if m not in ("LLMGen", TEXT_RETRIEVER)] + retriever
    ordered += [m for m in models if m == "LLMGen"]
    if requests and ("LLMGen" not in ordered or len(ordered) < 2):
        raise ValueError("requests: the request protocol needs LLMGen and a classic model in models")
    return ordered


def row_spec(model: str, dataset: str, protocol: str, overrides: dict, out: str, config_files, data_path,
             sample: dict | None) -> dict:  # fmt: skip
    """What one row runs: its RecBole model (the text retriever is LLMGen with a fixed config), config
    dict, config files, per-user file and sample of users."""
    recbole_model = "LLMGen" if model == TEXT_RETRIEVER else model
    config = model_config(recbole_model, dataset, protocol, overrides, out, config_files)
    if data_path is not None:  # the regime's copy of the data, for every model
        config["data_path"] = data_path
    if model == TEXT_RETRIEVER:
        config.update(TEXT_RETRIEVER_CONFIG)
    spec = {"model": recbole_model, "dataset": dataset, "config": config, "config_files": config_files}
    if model != recbole_model:
        spec["name"] = model
    spec["users_file"] = os.path.abspath(per_user.users_file(os.path.join(out, "runs", model)))
    if sample is not None:
        spec["eval_users"] = sample["users"]
        spec["eval_users_of"], spec["eval_users_seed"] = sample["of"], sample["seed"]
    return spec
