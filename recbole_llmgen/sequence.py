"""All-position training (``llm_train_objective: sequence``): windows of each user's training
history, written as the item list that ``prompt_format: list`` scoring continues.

RecBole's training split of a sequential model holds one augmented row per (history, target)
pair; :func:`training_sequences` rebuilds each user's training items from those rows (the first
row's history, then every target in time order), so no validation or test item can enter a
window. :func:`windows` cuts a sequence into windows of ``max_history_items + 1`` items that
start every ``stride`` items: with the default stride (``max_history_items``) every training
item but a user's first is predicted exactly once per epoch. :class:`WindowLoader` serves them
as RecBole ``Interaction`` batches, windows of similar token length together.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

WINDOW_FIELD = "llm_window"
WINDOW_LEN_FIELD = "llm_window_len"
POOL_BATCHES = 64  # batches whose windows are sorted by length together (little padding, still shuffled)


def training_sequences(dataset) -> dict[int, list[int]]:
    """Each user's training items in time order, from RecBole's augmented training rows."""
    uid, iid = dataset.uid_field, dataset.iid_field
    seq_field = iid + dataset.config["LIST_SUFFIX"]
    len_field = dataset.config["ITEM_LIST_LENGTH_FIELD"]
    users = dataset.inter_feat[uid].numpy()
    targets = dataset.inter_feat[iid].numpy()
    histories = dataset.inter_feat[seq_field].numpy()
    lengths = dataset.inter_feat[len_field].numpy()
    sequences: dict[int, list[int]] = {}
    for row in range(len(users)):
        user = int(users[row])
        if user not in sequences:  # a user's first row: its history is where the sequence starts
            sequences[user] = [int(i) for i in histories[row, : lengths[row]] if i]
        sequences[user].append(int(targets[row]))
    return sequences


def windows(sequence: Sequence[int], size: int, stride: int) -> list[list[int]]:
    """Windows of at most ``size`` items starting every ``stride`` items, each with >= 2 items
    (something to predict), together covering the whole sequence."""
    if len(sequence) < 2:
        return []
    found, start = [], 0
    while True:
        found.append(list(sequence[start : start + size]))
        if start + size >= len(sequence):
            return found
        start += stride
        if len(sequence) - start < 2:
            return found


class WindowLoader:
    """Training windows as RecBole ``Interaction`` batches of ``batch_size`` windows.

    Each epoch (``set_epoch``) shuffles with ``seed + epoch``: pools of windows are sorted by
    token length, cut into batches, and the batches shuffled. In RecBole's multi-process mode each
    rank takes every ``world``-th batch (the list padded with its first batches so every rank
    makes the same number of optimizer steps).
    """

    shuffle = True

    def __init__(self, dataset, items: list[list[int]], token_lengths: list[int], batch_size: int, seed: int):
        self.dataset = self._dataset = dataset
        self.items = items
        self.token_lengths = np.asarray(token_lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.rank, self.world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def predictions(self) -> int:
        return sum(len(w) - 1 for w in self.items)

    def batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed * 1_000_003 + self.epoch)
        order = rng.permutation(len(self.items))
        pool = self.batch_size * POOL_BATCHES
        batches = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(self.token_lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.world > 1:
            short = -len(batches) % self.world
            batches = batches + batches[:short]
            batches = batches[self.rank :: self.world]
        return batches

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self):
        from recbole.data.interaction import Interaction

        for batch in self.batches():
            rows = [self.items[i] for i in batch]
            width = max(len(r) for r in rows)
            window = torch.zeros((len(rows), width), dtype=torch.long)
            for b, row in enumerate(rows):
                window[b, : len(row)] = torch.tensor(row)
            yield Interaction({WINDOW_FIELD: window, WINDOW_LEN_FIELD: torch.tensor([len(r) for r in rows])})


def window_loader(train_data, model, batch_size: int, seed: int) -> WindowLoader:
    """Every training window of the split behind ``train_data`` (RecBole's training loader)."""
    dataset = train_data._dataset
    size = model.settings.max_history_items + 1
    items = [
        w for seq in training_sequences(dataset).values() for w in windows(seq, size, model.settings.window_stride)
    ]
    if not items:
        raise ValueError(
            "llm_train_objective: sequence found no user with two or more training interactions to make a window of"
        )
    return WindowLoader(dataset, items, [model.prompts.list_length(w) for w in items], batch_size, seed)
