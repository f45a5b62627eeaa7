"""Data regimes of the benchmark: sparse training data and cold-start users and items.

A regime changes the data every model of a run is given, never the split or the evaluator:

- ``train_fraction F`` keeps a seeded random fraction of each user's *training* interactions
  (everything before the user's last two, which RecBole's leave-one-out split in time order makes
  the valid and test targets: those are always kept). At least :data:`MIN_TRAIN` are kept (RecBole's
  sequential split needs two training items to keep a valid target apart from training). The kept
  rows are written, unchanged and in file order, to a copy of the atomic files
  (``OUT/data/fraction-F-seed-S/DATASET``) that every model of the run reads; RecBole's stable time
  sort then orders them exactly as it ordered the full file. The draw is one uniform number per
  interaction: a smaller fraction keeps a subset of a larger one's items.
- ``cold_users N`` evaluates only users with at most N training interactions (after the fraction);
  ``cold_items N`` only users whose test target has at most N training interactions in the whole
  (reduced) training data. Models train on every user; the table's test metrics are the means of
  the per-user values (``runs/MODEL.users.csv``) over the selected users, which is RecBole's figure
  for that subset (one target per user).

Training counts come from the atomic file with RecBole's own rule (stable time order, the last
``min(2, n - 1)`` interactions held out); :func:`check_targets` refuses a run whose per-user file
shows other test targets (a RecBole filter such as ``user_inter_num_interval`` changed the split).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass

import numpy as np

MIN_TRAIN = 2
HELD_OUT = 2  # leave-one-out: the valid and the test target
REGIME_KEYS = ("train_fraction", "cold_users", "cold_items")


@dataclass(frozen=True)
class Regime:
    train_fraction: float = 1.0
    cold_users: int | None = None
    cold_items: int | None = None

    @property
    def reduces_data(self) -> bool:
        return self.train_fraction < 1.0

    @property
    def selects_users(self) -> bool:
        return self.cold_users is not None or self.cold_items is not None

    @property
    def is_default(self) -> bool:
        return not (self.reduces_data or self.selects_users)

    def describe(self) -> str:
        parts = []
        if self.reduces_data:
            parts.append(f"train fraction {self.train_fraction:g} (at least {MIN_TRAIN} training items per user)")
        if self.cold_users is not None:
            parts.append(f"users with <= {self.cold_users} training interactions")
        if self.cold_items is not None:
            parts.append(f"test targets with <= {self.cold_items} training interactions")
        return "; ".join(parts) if parts else "all data, all users"


class RegimeUnavailable(ValueError):
    """The dataset cannot carry a data regime (no time column, rows RecBole filters out): a named
    error for a regime that needs it; the plain benchmark then runs without the per-user table."""


def check_regime(train_fraction=None, cold_users=None, cold_items=None) -> Regime:
    """A :class:`Regime` from the benchmark's options, or a named error saying what is allowed."""
    fraction = 1.0 if train_fraction is None else train_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"train_fraction: expected a number in (0, 1] (the share of training interactions kept), "
                         f"got {train_fraction!r}")  # fmt: skip
    for key, value in (("cold_users", cold_users), ("cold_items", cold_items)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{key}: expected an integer >= 0 (a number of training interactions), got {value!r}")
    return Regime(float(fraction), cold_users, cold_items)


def _column(header: list[str], name: str, path: str) -> int:
    names = [field.split(":")[0] for field in header]
    if name not in names:
        raise RegimeUnavailable(f"{path}: no {name!r} column (has {', '.join(names)}); a data regime needs it")
    return names.index(name)


def read_interactions(folder: str, dataset: str, fields: dict, separator: str = "\t"):
    """``(header line, data lines, users, items, times)`` of ``DATASET.inter``, lines kept verbatim."""
    path = os.path.join(folder, f"{dataset}.inter")
    with open(path, encoding="utf-8") as f:
        header, *lines = f.read().splitlines()
    lines = [line for line in lines if line.strip()]
    columns = header.split(separator)
    at = {key: _column(columns, name, path) for key, name in fields.items()}
    cells = [line.split(separator) for line in lines]
    users = np.array([c[at["user"]] for c in cells], dtype=object)
    items = np.array([c[at["item"]] for c in cells], dtype=object)
    times = np.array([float(c[at["time"]]) for c in cells], dtype=np.float64)
    return header, lines, users, items, times


def split_positions(users: np.ndarray, times: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{user: (training row indices, held-out row indices)}``, each in RecBole's order (stable
    time sort; the last ``min(2, n - 1)`` rows held out, the last of them the test target)."""
    order = np.argsort(times, kind="stable")
    by_user: dict[str, list[int]] = {}
    for row in order:
        by_user.setdefault(users[row], []).append(int(row))
    split = {}
    for user, rows in by_user.items():
        held = min(HELD_OUT, len(rows) - 1)
        cut = len(rows) - held
        split[user] = (np.array(rows[:cut], dtype=np.int64), np.array(rows[cut:], dtype=np.int64))
    return split


def kept_rows(split: dict, n_rows: int, fraction: float, seed: int, always: list[int] = ()) -> np.ndarray:
    """Sorted indices of the rows kept at ``fraction``: every held-out row, ``always``, and per
    user the ``max(MIN_TRAIN, round(fraction * n))`` training rows with the smallest seeded draw."""
    draw = np.random.default_rng(seed).random(n_rows)
    keep = list(always)
    for train, held in split.values():
        count = min(len(train), max(MIN_TRAIN, math.floor(fraction * len(train) + 0.5)))
        keep.extend(train[np.argsort(draw[train], kind="stable")[:count]].tolist())
        keep.extend(held.tolist())
    return np.unique(np.array(keep, dtype=np.int64))


def user_table(split: dict, items: np.ndarray):
    """Per user: training interactions, test target, and the target's training interactions."""
    import pandas as pd

    train_items = np.concatenate([train for train, _ in split.values()] or [np.zeros(0, np.int64)])
    counts = pd.Series(items[train_items]).value_counts()
    rows = []
    for user, (train, held) in split.items():
        target = items[held[-1]] if len(held) else None
        rows.append((user, len(train), target, int(counts.get(target, 0)) if target is not None else None))
    frame = pd.DataFrame(rows, columns=["user_id", "train_items", "target", "target_train_count"])
    return frame.set_index("user_id")


def regime_folder(regime: Regime, seed: int) -> str:
    return f"fraction-{regime.train_fraction:g}-seed-{seed}"


def recbole_sort_keys(config, users: np.ndarray) -> np.ndarray:
    """The time values RecBole sorts ``DATASET.inter`` by, in file order: its own preprocessing
    (``normalize_all`` scales timestamps by the file's range, then float32, where timestamps a few
    seconds apart tie and file order decides). A named error when RecBole drops or reorders rows."""
    from recbole.data import create_dataset

    feat = create_dataset(config).inter_feat
    uid = config["USER_ID_FIELD"]
    tokens = feat[uid].to_numpy() if hasattr(feat[uid], "to_numpy") else feat[uid].numpy()
    if len(tokens) != len(users):
        raise RegimeUnavailable(
            f"data regime: RecBole keeps {len(tokens)} of the {len(users)} rows of {config['dataset']}.inter "
            "(filters such as user_inter_num_interval, val_interval or rm_dup_inter); a regime needs every row"
        )
    return feat[config["TIME_FIELD"]].to_numpy().astype(np.float32)


def prepare(regime: Regime, config, out: str) -> tuple[str | None, object]:
    """Write the regime's copy of the dataset (when it reduces data) under ``OUT/data``; returns
    ``(data_path for the run or None to keep the user's, per-user table after the regime)``.
    ``config``: RecBole's Config of the run (dataset folder, columns, separator, seed, split)."""
    dataset, source = config["dataset"], config["data_path"]
    if not os.path.isfile(os.path.join(source, f"{dataset}.inter")):
        raise FileNotFoundError(
            f"dataset: {os.path.join(source, dataset + '.inter')!r} does not exist; a data regime (train_fraction, "
            "cold_users, cold_items) reads the dataset's atomic files"
        )
    if config["TIME_FIELD"] is None:
        raise RegimeUnavailable("TIME_FIELD: a data regime needs the time column the leave-one-out split orders by")
    fields = {"user": config["USER_ID_FIELD"], "item": config["ITEM_ID_FIELD"], "time": config["TIME_FIELD"]}
    header, lines, users, items, times = read_interactions(source, dataset, fields, config["field_separator"])
    keys = recbole_sort_keys(config, users)
    split = split_positions(users, keys)
    if not regime.reduces_data:
        return None, user_table(split, items)
    # the first and the last timestamp of the file stay: RecBole scales times by their range, so
    # every kept time (and RecBole's order of the kept rows) is what it was in the whole file
    ends = [int(np.argmin(times)), int(np.argmax(times))]
    keep = kept_rows(split, len(lines), regime.train_fraction, int(config["seed"]), always=ends)
    root = os.path.join(out, "data", regime_folder(regime, int(config["seed"])))
    folder = os.path.join(root, dataset)
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, f"{dataset}.inter")
    tmp = target + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join([header, *(lines[i] for i in keep)]) + "\n")
    os.replace(tmp, target)
    for name in os.listdir(source):  # the item, user, ... files unchanged
        if name.startswith(f"{dataset}.") and not name.endswith(".inter"):
            copy = os.path.join(folder, name)
            if not os.path.isfile(copy) or os.path.getsize(copy) != os.path.getsize(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), copy)
    reduced = split_positions(users[keep], keys[keep])
    return os.path.abspath(root), user_table(reduced, items[keep])


def selected_users(regime: Regime, table) -> list[str]:
    """Users the regime evaluates (every user with a test target unless a cold filter is set);
    a named error when none is left."""
    chosen = table[table["target"].notna()]
    if regime.cold_users is not None:
        chosen = chosen[chosen["train_items"] <= regime.cold_users]
    if regime.cold_items is not None:
        chosen = chosen[chosen["target_train_count"] <= regime.cold_items]
    if chosen.empty:
        fewest = int(table["train_items"].min()) if len(table) else 0
        rarest = table["target_train_count"].min() if len(table) else 0
        raise ValueError(
            f"regime: {regime.describe()} leaves no user to evaluate (fewest training interactions of a user: "
            f"{fewest}; of a test target: {int(rarest) if rarest == rarest else 0}); raise cold_users / cold_items"
        )
    return list(chosen.index)


def check_targets(frame, table, name: str) -> None:
    """A named error unless ``frame`` (a per-user file) evaluated every user of ``table`` on the
    test target the atomic file gives."""
    missing = table.index.difference(frame.index)
    users = table.index.intersection(frame.index)
    differ = users[
        frame.loc[users, "targets"].astype(str).to_numpy() != table.loc[users, "target"].astype(str).to_numpy()
    ]
    if len(missing) or len(differ):
        user = missing[0] if len(missing) else differ[0]
        raise ValueError(
            f"{name}: RecBole's test split differs from the atomic file's (user {user!r}); a data regime counts "
            "training interactions in the file: drop filters such as user_inter_num_interval"
        )
