"""What the benchmark scripts share: RecBole's data preparation, a seeded sample of users to
evaluate, and a timed evaluation through RecBole's own Trainer.evaluate.

RecBole's Config reads ``--key=value`` from ``sys.argv``: scripts parse their own arguments, then
reset ``sys.argv`` before calling :func:`prepare`.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

import recbole_llmgen  # noqa: F401  (compatibility fixes, LLMGen registered)


def prepare(model: str, dataset: str, config_dict: dict):
    """(config, train, valid, test) exactly as RecBole's run_recbole builds them, every column
    loaded for datasets without a RecBole yaml (as the benchmark command does)."""
    from recbole.config import Config

    from recbole_llmgen.integration import every_column_unless_set, load_data

    config = Config(model=model, dataset=dataset, config_dict=every_column_unless_set(dataset, config_dict))
    return (config, *load_data(config))


def method_runs(methods: str, dataset: str, overrides: dict, prefix: str):
    """(method, config, train, test) for each ``score_method`` of LLMGen, checkpoints in a temp folder."""
    out = tempfile.mkdtemp(prefix=prefix)
    for method in methods.split(","):
        config_dict = {"score_method": method, "checkpoint_dir": os.path.join(out, "saved"), **overrides}
        config, train_data, _, test_data = prepare("LLMGen", dataset, config_dict)
        yield method, config, train_data, test_data


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
