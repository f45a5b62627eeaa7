"""Per-user metric values from RecBole's evaluator, and how sure a benchmark can be of them.

RecBole averages each top-k metric over users; the collector already holds, per user, where the
targets landed in the top k (``rec.topk``). :func:`per_user_values` computes each user's value
with RecBole's own metric classes, so their mean is RecBole's figure. :func:`users_in_order`
names the user of each row (the evaluation loader's order). The rest is statistics over users:
a seeded percentile bootstrap of a mean (:func:`bootstrap_interval`) and of a paired difference
between two models on the same users (:func:`paired_difference`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
SEED = 2020
LEVEL = 0.95
SUFFIX = ".users.csv"


def per_user_values(struct, evaluator, topk: Sequence[int]) -> dict[str, np.ndarray]:
    """``{"ndcg@10": [n_users], ...}`` for every top-k metric of ``evaluator`` (RecBole's
    ``Evaluator``) on the collected ``struct``; metrics without per-user values (AUC, ...) are left out."""
    values = {}
    for name, metric in evaluator.metric_class.items():
        if not (hasattr(metric, "used_info") and hasattr(metric, "metric_info")):
            continue
        pos_index, pos_len = metric.used_info(struct)
        takes_len = len(inspect.signature(metric.metric_info).parameters) > 1  # NDCG, Recall, MAP: pos_len too
        matrix = metric.metric_info(pos_index, pos_len) if takes_len else metric.metric_info(pos_index)
        for k in topk:
            values[f"{name}@{k}"] = np.asarray(matrix[:, k - 1], dtype=np.float64)
    return values


def users_in_order(loader) -> tuple[list[str], list[str]]:
    """The user token and the target item tokens (space-joined, sorted) of each row of the
    collected struct, in RecBole's evaluation order.

    Full ranking: one row per row of each batch's interaction (a user, or a user's test target in
    sequential splits). Sampled protocols (uni19, ...): one row per user of the batch, numbered by
    the batch's ``row_idx``. A row's targets are the batch's ``positive_i`` where ``positive_u``
    names that row.
    """
    dataset = loader._dataset
    field = dataset.uid_field
    tokens = dataset.field2id_token[field]
    item_tokens = dataset.field2id_token[dataset.iid_field]
    users, targets = [], []
    for batch in loader:
        interaction, row_idx, positive_u, positive_i = batch
        ids = interaction[field].cpu().numpy()
        if row_idx is not None and not isinstance(row_idx, tuple):  # sampled: several rows per user
            rows = row_idx.cpu().numpy()
            first = np.unique(rows, return_index=True)[1]
            ids = ids[first]
        positive_u, positive_i = positive_u.cpu().numpy(), positive_i.cpu().numpy()
        for row, user in enumerate(ids):
            users.append(str(tokens[user]))
            targets.append(" ".join(sorted(str(item_tokens[i]) for i in positive_i[positive_u == row])))
    return users, targets


def write_users(
    path: str, users: Sequence[str], split: str, values: dict[str, np.ndarray], targets: Sequence[str] | None = None
) -> None:
    """``user_id, split, targets, <metric>...``, one row per evaluated row (``targets``: the test
    items' tokens, so runs on another split are told apart); written to a temporary file first."""
    import pandas as pd

    lengths = {len(v) for v in values.values()}
    if lengths != {len(users)}:
        raise ValueError(f"per-user values: {sorted(lengths)} rows of metrics for {len(users)} users")
    frame = pd.DataFrame({"user_id": list(users), "split": split})
    if targets is not None:
        frame["targets"] = list(targets)
    for name, column in values.items():
        frame[name] = column
    tmp = f"{path}.tmp"
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def users_file(run: str) -> str:
    """``DIR/runs/MODEL.users.csv`` for ``DIR/runs/MODEL`` (or the file itself)."""
    return run if run.endswith(SUFFIX) else run.removesuffix(".json") + SUFFIX


def read_users(run: str, split: str = "test"):
    """One model run's per-user values of ``split`` (a frame indexed by user token)."""
    import pandas as pd

    path = users_file(run)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"per-user file: {path!r} does not exist; a benchmark run writes DIR/runs/MODEL{SUFFIX} for each model "
            "(rerun the benchmark with this version to get it)"
        )
    frame = pd.read_csv(path, dtype={"user_id": str, "targets": str}, keep_default_na=False)
    frame = frame[frame["split"] == split]
    if frame["user_id"].duplicated().any():
        frame = frame.assign(user_id=frame["user_id"] + "#" + frame.groupby("user_id").cumcount().astype(str))
    return frame.set_index("user_id").drop(columns="split")


def same_evaluation(a, b, names: tuple[str, str] = ("A", "B")) -> None:
    """A named error unless both runs evaluated the same users on the same target items."""
    only_a, only_b = a.index.difference(b.index), b.index.difference(a.index)
    if len(only_a) or len(only_b):
        raise ValueError(
            f"{names[0]} and {names[1]} evaluated different users ({len(a)} and {len(b)}; "
            f"{len(only_a)} only in {names[0]}, e.g. {list(only_a[:3])}, {len(only_b)} only in {names[1]}, "
            f"e.g. {list(only_b[:3])}): compare runs on the same split and filtering"
        )
    if "targets" in a.columns and "targets" in b.columns:
        differ = a.index[a["targets"].to_numpy() != b.loc[a.index, "targets"].to_numpy()]
        if len(differ):
            raise ValueError(
                f"{names[0]} and {names[1]} evaluated the same users on different target items ({len(differ)} "
                f"users, e.g. {differ[0]!r}: {a.loc[differ[0], 'targets']!r} against "
                f"{b.loc[differ[0], 'targets']!r}): compare runs on the same split"
            )


def aligned(a, b, metric: str, names: tuple[str, str] = ("A", "B")) -> tuple[np.ndarray, np.ndarray]:
    """The two runs' values of ``metric`` on the same users, in one order; a named error when the
    runs evaluated different users or targets, or lack the metric."""
    for frame, name in zip((a, b), names):
        if metric not in frame.columns or metric == "targets":
            metrics = [c for c in frame.columns if c != "targets"]
            raise ValueError(f"metric: {metric!r} was not computed in {name}; it has {', '.join(metrics)}")
    same_evaluation(a, b, names)
    order = a.index
    return a.loc[order, metric].to_numpy(float), b.loc[order, metric].to_numpy(float)


def _resampled_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(values), size=(resamples, len(values)))
    return values[index].mean(axis=1)


def bootstrap_interval(
    values: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over users (users resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("bootstrap_interval: no users")
    means = _resampled_means(values, resamples, seed)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(
    a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over the same users and its paired bootstrap interval (the same resampled
    users for both). An interval that excludes 0 marks a difference this many users support."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.shape} and {b.shape} values; pair them by user first")
    low, high = bootstrap_interval(a - b, resamples, seed, level)
    return float((a - b).mean()), low, high
