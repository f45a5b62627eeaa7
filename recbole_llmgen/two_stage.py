"""Two-stage ranking: any RecBole model proposes the candidates that LLMGen reranks.

``candidate_source`` takes ``pop``, ``text``, a saved RecBole checkpoint (``.pth`` of a built-in
such as SASRec, BPR, GRU4Rec) or the name of a RecBole model, which LLMGenTrainer trains first
on the same dataset and split. The candidate model must index items exactly as LLMGen's dataset
does; a checkpoint of another dataset or another filtering is refused with a named error.
"""

from __future__ import annotations

import os

import torch

BUILT_IN_SOURCES = ("pop", "text")
# config keys that change which interactions and items survive loading: named when mappings differ
FILTER_KEYS = (
    "dataset",
    "data_path",
    "load_col",
    "unload_col",
    "rm_dup_inter",
    "val_interval",
    "filter_inter_by_user_or_item",
    "user_inter_num_interval",
    "item_inter_num_interval",
    "benchmark_filename",
    "alias_of_item_id",
)


def is_model_file(source: str) -> bool:
    return source.endswith(".pth") or os.path.sep in source or os.path.isfile(source)


def validate_source(source: str) -> str:
    """'builtin', 'file' or 'model' for a ``candidate_source`` value; a named error otherwise."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"candidate_source: expected pop, text, a RecBole model file or model name, got {source!r}")
    if source in BUILT_IN_SOURCES:
        return "builtin"
    if is_model_file(source):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"candidate_source: model file {source!r} does not exist")
        return "file"
    from recbole_llmgen.registry import known_model_names

    names = known_model_names()
    if source not in names:
        raise ValueError(
            f"candidate_source: {source!r} is not allowed; choose pop, text, a saved RecBole model file "
            f"(.pth) or a RecBole model name such as SASRec, BPR, GRU4Rec (known: {len(names)} models)"
        )
    if source == "LLMGen":
        raise ValueError("candidate_source: LLMGen cannot propose its own candidates; choose a classic model")
    return "model"


def _item_tokens(config) -> list[str]:
    from recbole.data import create_dataset

    dataset = create_dataset(config)
    return [str(t) for t in dataset.field2id_token[dataset.iid_field]]


def load_candidate_model(path: str, config, dataset):
    """The RecBole model saved at ``path``, rebuilt on ``dataset`` (frozen, eval mode)."""
    from recbole.utils import get_model

    from recbole_llmgen.compat import trusted_torch_load

    with trusted_torch_load():  # a file the user named, as RecBole's own load points
        checkpoint = torch.load(path, map_location="cpu")
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"candidate_source: {path} is not a RecBole checkpoint (no config / state_dict in it)")
    saved = checkpoint["config"]
    name = saved["model"]
    if name == "LLMGen":
        raise ValueError(f"candidate_source: {path} is an LLMGen checkpoint; choose a classic model's checkpoint")
    if saved["dataset"] != config["dataset"]:
        raise ValueError(
            f"candidate_source: {path} ({name}) was trained on dataset {saved['dataset']!r}, "
            f"not {config['dataset']!r}; train it on {config['dataset']!r} or name the model instead"
        )
    ours = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
    theirs = _item_tokens(saved)
    if theirs != ours:
        differ = [k for k in FILTER_KEYS if saved[k] != config[k]]
        raise ValueError(
            f"candidate_source: {path} ({name}) indexes {len(theirs) - 1} items of {saved['dataset']!r} "
            f"differently from this run ({len(ours) - 1} items): another item mapping (different "
            f"filtering or files). Settings that differ: {differ or 'none among ' + ', '.join(FILTER_KEYS)}"
        )
    model = get_model(name)(saved, dataset)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    model.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def candidate_scores(model, interaction, device) -> torch.Tensor:
    """The candidate model's full-ranking scores for the batch's users. [B, n_items]"""
    model.eval()
    scores = model.full_sort_predict(interaction.to(device))
    return scores.view(len(interaction), -1).float().cpu()


def _llmgen_keys() -> set[str]:
    import yaml

    path = os.path.join(os.path.dirname(__file__), "properties", "LLMGen.yaml")
    with open(path, encoding="utf-8") as f:
        return set(yaml.safe_load(f))


def llmgen_only_keys() -> set[str]:
    """LLMGen's own keys (its yaml minus the RecBole keys it also sets): other models ignore them."""
    import recbole
    import yaml

    path = os.path.join(os.path.dirname(recbole.__file__), "properties", "overall.yaml")
    with open(path, encoding="utf-8") as f:
        recbole_keys = set(yaml.safe_load(f))
    return _llmgen_keys() - recbole_keys - {"train_neg_sample_args", "eval_batch_size", "data_path"}


def candidate_model_config(name: str, config) -> dict:
    """Config dict for the model named in ``candidate_source``: the run's own settings (minus
    LLMGen's keys), the same split (``eval_args``), columns and seed, then ``candidate_model_config``."""
    llmgen_keys = _llmgen_keys()
    shared = {k: v for k, v in config.external_config_dict.items() if k not in llmgen_keys and k != "model"}
    for key in ("eval_args", "load_col", "seed", "checkpoint_dir", "alias_of_item_id"):
        shared[key] = config[key]
    # RecBole's final data_path is <data_path>/<dataset>: hand the folder above it on
    shared["data_path"] = os.path.dirname(os.path.normpath(config["data_path"]))
    own = config["candidate_model_config"] or {}
    if not isinstance(own, dict):
        raise ValueError(f"candidate_model_config: expected a dict of RecBole settings for {name}, got {own!r}")
    return {**shared, **own}


def build_config(name: str, dataset: str, config_dict: dict, config_file_list: list[str] | None = None):
    """RecBole's Config for ``name``. A sequential model with the CE loss needs
    ``train_neg_sample_args: None`` in RecBole 1.2.1; it is set when the user did not say."""
    from recbole.config import Config

    try:
        return Config(model=name, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    except ValueError as error:
        if "train_neg_sample_args" not in str(error) or "train_neg_sample_args" in config_dict:
            raise
        config_dict = {**config_dict, "train_neg_sample_args": None}
        return Config(model=name, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)


def train_candidate_model(name: str, config, show_progress: bool = False) -> str:
    """Train RecBole's ``name`` on the run's dataset and split; returns its best checkpoint."""
    from recbole.utils import get_trainer

    from recbole_llmgen.quick_start import build_model, load_data

    own = build_config(name, config["dataset"], candidate_model_config(name, config))
    train_data, valid_data, _ = load_data(own)
    trainer = get_trainer(own["MODEL_TYPE"], name)(own, build_model(own, train_data))
    trainer.fit(train_data, valid_data, saved=True, show_progress=show_progress)
    return trainer.saved_model_file
