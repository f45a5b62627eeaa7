"""What the benchmark scripts share: RecBole's data preparation, a seeded sample of users to
evaluate, and a timed evaluation through RecBole's own Trainer.evaluate.

RecBole's Config reads ``--key=value`` from ``sys.argv``: scripts parse their own arguments, then
reset ``sys.argv`` before calling :func:`prepare`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

import recbole_llmgen  # noqa: F401  (compatibility fixes, LLMGen registered)


def prepare(model: str, dataset: str, config_dict: dict):
    """(config, train, valid, test) exactly as RecBole's run_recbole builds them."""
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_llmgen.model import has_recbole_dataset_yaml

    if "load_col" not in config_dict and not has_recbole_dataset_yaml(dataset):
        # RecBole's sample.yaml would load only user_id and item_id for every model but LLMGen:
        # no timestamps, so no time-ordered split. Every model loads every column instead.
        config_dict = {**config_dict, "load_col": None}
    config = Config(model=model, dataset=dataset, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    data = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, data)
    return config, train_data, valid_data, test_data


def build_model(config, train_data):
    from recbole.utils import get_model, init_seed

    init_seed(config["seed"], config["reproducibility"])
    return get_model(config["model"])(config, train_data._dataset).to(config["device"])


def sample_users(loader, n_users: int, seed: int):
    """A loader of the same kind over a seeded random sample of ``n_users`` of its users (all when
    ``n_users`` is 0 or at least their number). The same seed picks the same users for every
    model, so their metrics are comparable."""
    dataset = loader._dataset
    users = np.unique(dataset.inter_feat[dataset.uid_field].numpy())
    if not n_users or n_users >= len(users):
        return loader
    chosen = np.random.default_rng(seed).choice(users, size=n_users, replace=False)
    keep = np.isin(dataset.inter_feat[dataset.uid_field].numpy(), chosen)
    subset = dataset.copy(dataset.inter_feat[torch.from_numpy(np.flatnonzero(keep))])
    return type(loader)(loader.config, subset, loader._sampler, shuffle=False)


def timed_evaluate(trainer, loader, config, show_progress: bool = False) -> tuple[dict, float]:
    """Metrics (rounded floats) and seconds of ``trainer.evaluate`` on ``loader``. The seed is
    reset first, so sampled negatives (uni19, uni100) are the same for every model."""
    from recbole.utils import init_seed

    init_seed(config["seed"], config["reproducibility"])
    start = time.perf_counter()
    result = trainer.evaluate(loader, load_best_model=False, show_progress=show_progress)
    seconds = time.perf_counter() - start
    return {k: round(float(v), 4) for k, v in result.items()}, round(seconds, 1)


def users_in(loader) -> int:
    dataset = loader._dataset
    return len(np.unique(dataset.inter_feat[dataset.uid_field].numpy()))
