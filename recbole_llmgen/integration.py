"""Everything the plugin builds with RecBole, in one place: configs, data, models, checkpoints.

* :func:`build_config`: RecBole's ``Config`` for any model (LLMGen or a built-in), with the plugin's
  defaults: :data:`DEFAULT_DATA_PATH` (defined here only) for datasets other than the bundled
  ml-100k, every column of a dataset without a RecBole yaml, ``train_neg_sample_args: None`` for a
  CE-loss sequential model when the user did not say.
* :func:`finalize_config`: LLMGen's last word on a merged Config (load its item text fields).
* :func:`load_data`, :func:`build_model`, :func:`load_model`: the loaders and model of a config or a
  checkpoint, seeded as RecBole's ``run_recbole`` seeds them; :func:`user_histories`.
* :func:`recbole_argv`: RecBole's Config parses ``--key=value`` from ``sys.argv``; show it only ours.

What the plugin *changes* in RecBole lives in :mod:`recbole_llmgen.patches`; this module only calls
RecBole's public functions.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import yaml

from recbole_llmgen import text
from recbole_llmgen.prompts import read_atomic_header

DEFAULT_DATA_PATH = "datasets/"  # where datasets other than the bundled ml-100k are read from
PROPERTIES = os.path.join(os.path.dirname(__file__), "properties", "LLMGen.yaml")


@contextlib.contextmanager
def recbole_argv(argv: list[str] | None = None) -> Iterator[None]:
    """RecBole's Config parses ``--key=value`` from ``sys.argv``: show it only ``argv``."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "recbole-llmgen", *(argv or [])]
    try:
        yield
    finally:
        sys.argv = saved


# ---------------------------------------------------------------------------- configs


def user_sets(key: str, config_file_list, config_dict) -> bool:
    """Whether the user's config dict or files set ``key``."""
    if config_dict and key in config_dict:
        return True
    for path in config_file_list or []:
        with open(path, encoding="utf-8") as f:
            if key in (yaml.safe_load(f) or {}):
                return True
    return False


def with_data_path(config_dict: dict, config_file_list=None) -> dict:
    """``config_dict`` with the default ``data_path`` unless the user set one."""
    if user_sets("data_path", config_file_list, config_dict):
        return dict(config_dict)
    return {**config_dict, "data_path": DEFAULT_DATA_PATH}


def has_recbole_dataset_yaml(dataset: str) -> bool:
    import recbole

    root = os.path.dirname(recbole.__file__)
    return os.path.isfile(os.path.join(root, "properties", "dataset", f"{dataset}.yaml"))


def every_column_unless_set(dataset: str, config_dict: dict) -> dict:
    """``config_dict`` with ``load_col: None`` for a dataset without a RecBole yaml (unless set):
    RecBole's sample.yaml would load only user_id and item_id for every model but LLMGen, so no
    timestamps for a time-ordered split. Comparing models needs every model to load every column."""
    if "load_col" in config_dict or has_recbole_dataset_yaml(dataset):
        return config_dict
    return {**config_dict, "load_col": None}


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


def llmgen_keys() -> set[str]:
    """Every key of LLMGen's yaml."""
    with open(PROPERTIES, encoding="utf-8") as f:
        return set(yaml.safe_load(f))


def llmgen_only_keys() -> set[str]:
    """LLMGen's own keys (its yaml minus the RecBole keys it also sets): other models ignore them."""
    import recbole

    path = os.path.join(os.path.dirname(recbole.__file__), "properties", "overall.yaml")
    with open(path, encoding="utf-8") as f:
        recbole_keys = set(yaml.safe_load(f))
    shared = {"train_neg_sample_args", "eval_batch_size", "data_path", "seen_items"}  # keys every model reads
    return llmgen_keys() - recbole_keys - shared


def _alias_history_lists(config) -> None:
    """Pre-split benchmark files may carry each history as ``item_id_list``: map its tokens into
    the item id space (RecBole's ``alias_of_item_id``) unless the user configured aliases."""
    final = config.final_config_dict
    splits = final.get("benchmark_filename")
    if not splits or "alias_of_item_id" in config.external_config_dict:
        return
    list_field = final["ITEM_ID_FIELD"] + final["LIST_SUFFIX"]
    header = read_atomic_header(os.path.join(final["data_path"], f"{final['dataset']}.{splits[0]}.inter"))
    if list_field in header:
        final["alias_of_item_id"] = [*(final.get("alias_of_item_id") or []), list_field]


def finalize_config(config) -> None:
    """LLMGen's Config after every layer is merged: RecBole loads the item fields (ml-100k's yaml
    loads only the .inter columns). A ``load_col`` the user wrote is left alone: the model then
    names any missing field and how to add it."""
    _alias_history_lists(config)
    final = config.final_config_dict
    load_col = final.get("load_col")
    if not isinstance(load_col, dict) or "load_col" in config.external_config_dict:
        return
    if not has_recbole_dataset_yaml(final["dataset"]):
        # RecBole's sample.yaml would load only user_id and item_id: no timestamps to order
        # histories by, no item texts. A user's own dataset loads every column.
        final["load_col"] = None
        return
    fields = final.get("item_text_fields", "auto")
    item_id = final["ITEM_ID_FIELD"]
    header = read_atomic_header(os.path.join(final["data_path"], f"{final['dataset']}.item"))
    if fields == "auto":
        if not header:
            return  # no .item file: the model reports it
        fields = text.default_text_fields(header, item_id)
    if isinstance(fields, str):
        fields = [fields]
    item_cols = list(load_col.get("item", [])) or [item_id]
    # the text fields, and every other item field: a request ("a comedy") is matched to them (genres...)
    for field in [item_id, *fields, *(header or [])]:
        if field not in item_cols:
            item_cols.append(field)
    final["load_col"] = {**load_col, "item": item_cols}


# ---------------------------------------------------------------------------- data and models


def load_data(config):
    """RecBole's (train, valid, test) loaders for ``config``, seeded as its run_recbole seeds them."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    init_seed(config["seed"], config["reproducibility"])
    return data_preparation(config, create_dataset(config))


def build_model(config, train_data):
    """``config['model']`` on the training dataset, seeded and on the configured device."""
    from recbole.utils import get_model, init_seed

    init_seed(config["seed"], config["reproducibility"])
    return get_model(config["model"])(config, train_data._dataset).to(config["device"])


def load_model(model: str, dataset: str | None, config_file_list, config_dict, model_file: str | None):
    """``(config, model, full dataset)`` from a saved checkpoint (``model_file``) or a config."""
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.quick_start import load_data_and_model
    from recbole.utils import get_model, init_seed

    if model_file is not None:
        config, model_obj, full, *_ = load_data_and_model(model_file)
        if dataset is not None and dataset != config["dataset"]:
            raise ValueError(
                f"model_file: {model_file} was trained on dataset {config['dataset']!r}, not {dataset!r}; "
                f"use --dataset {config['dataset']} or a model file of {dataset!r}"
            )
        return config, model_obj, full
    if dataset is None:
        raise ValueError("dataset: give a dataset name (or a model_file to take it from)")
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    full = create_dataset(config)
    train_data, _, _ = data_preparation(config, full)
    model_obj = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    return config, model_obj, full


def user_histories(full, user_ids: list[int], uid_field: str, iid_field: str, time_field: str | None):
    """Each user's whole history in the filtered dataset, oldest first: {inner user id: [item ids]}
    (a sequential dataset's first item included: it is in no row's target)."""
    inter = full.inter_feat
    users = inter[uid_field].numpy()
    items = inter[iid_field].numpy()
    order = range(len(users))
    if time_field and time_field in inter.interaction:
        times = inter[time_field].numpy()
        order = sorted(order, key=lambda r: (times[r], r))
    wanted = set(user_ids)
    histories = {u: [] for u in user_ids}
    # a sequential dataset holds one row per (history, target): a user's first item is only in the
    # history of their first row
    seq_field = iid_field + full.config["LIST_SUFFIX"]
    lists = inter[seq_field].numpy() if seq_field in inter.interaction else None
    lengths = inter[full.config["ITEM_LIST_LENGTH_FIELD"]].numpy() if lists is not None else None
    for r in order:
        user = int(users[r])
        if user in wanted:
            if lists is not None and not histories[user]:
                histories[user].extend(int(i) for i in lists[r, : lengths[r]] if i)
            histories[user].append(int(items[r]))
    return histories


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A RecBole checkpoint this run wrote or the user named (a pickle: see README, Safety). The one
    ``weights_only=False`` load of the package besides RecBole's own load points
    (:func:`recbole_llmgen.compat.trusted_torch_load`); its callers: a ``candidate_source`` model file
    (two_stage), the request protocol's LLMGen checkpoint (request_bench), a multi-process run's own
    best checkpoint on every rank (distributed), and two benchmark scripts' own checkpoints."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=False)


def only_users(loader, tokens):
    """An evaluation loader of the same kind over the rows of the users named by ``tokens`` (their
    ids as in the data files); users the dataset does not hold (filtered by RecBole) are skipped.
    The training items masked in full ranking come from the same sampler, so every kept user is
    ranked exactly as in the whole split."""
    import numpy as np
    import torch

    from recbole_llmgen import seen_items

    dataset = loader._dataset
    field = dataset.uid_field
    known = dataset.field2token_id[field]
    ids = np.asarray([known[t] for t in tokens if t in known], dtype=np.int64)
    keep = np.isin(dataset.inter_feat[field].numpy(), ids)
    subset = dataset.copy(dataset.inter_feat[torch.from_numpy(np.flatnonzero(keep))])
    sampled = type(loader)(loader.config, subset, loader._sampler, shuffle=False)
    seen_items.carry(loader, sampled)  # the same items masked as in the whole split
    return sampled
