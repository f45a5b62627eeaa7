"""One ranking rule for every model: may a full ranking place an item the user has already seen?

``seen_items: mask`` (the default) excludes, for every evaluated row of every model, each item the
user interacted with before the evaluated one; ``seen_items: keep`` excludes nothing for any model.

RecBole 1.2.1 has two rules in one evaluator: its ``FullSortEvalDataLoader`` hands the trainer
the earlier items of a *general* model's users (Pop, BPR, LightGCN: ``used_ids - positives`` of
the phase, i.e. every training item in valid and every training and valid item in test) but
nothing for a *sequential* model's rows (SASRec, GRU4Rec: its ``is_sequential`` branch), so a
sequential model spends top-k slots on items the user already rated, and a general model cannot.
This module is the one piece of code that makes the rule the same:

* :func:`prepare` (run after RecBole's ``data_preparation``) gives each full-ranking evaluation
  loader of a sequential model the items each user saw in the earlier phases (training items,
  and valid items when testing);
* :func:`collate_fn` (RecBole's collate, then the rule) returns ``history_index`` for a sequential
  model's rows under ``mask`` (the earlier phases' items, the row's own history and the user's
  earlier rows of the phase, never the evaluated item itself, as RecBole's general rule never masks
  a positive), and no ``history_index`` for any model under ``keep``. A general model under ``mask``
  keeps RecBole's own ``history_index``: its rows are identical under RecBole and here.

RecBole's trainer applies ``history_index`` (``scores[history_index] = -inf``) and its metrics are
untouched. LLMGen reads the same key: under ``mask`` it never proposes a seen item (candidates and
beams), under ``keep`` it may (:class:`recbole_llmgen.retriever.Retriever`). Sampled protocols
(``uni19``, ``uni100``) rank a user's sampled items only: the rule does not apply there.
"""

from __future__ import annotations

import numpy as np
import torch

RULES = ("mask", "keep")
DEFAULT = "mask"
KEY = "seen_items"
_EARLIER = "llmgen_earlier_items"  # loader attribute: {inner user id: items of the earlier phases}
_ROWS = "llmgen_seen_rows"  # loader attribute, built on first use: per dataset row, the items to mask


def check(value) -> str:
    """The rule named by a ``seen_items`` value (None: the default), or a named error."""
    if value is None:
        return DEFAULT
    if value not in RULES:
        raise ValueError(
            f"seen_items: {value!r} is not allowed; choose mask (never rank an item the user saw before the "
            f"evaluated one, for every model) or keep (rank every item, for every model)"
        )
    return value


def rule(config) -> str:
    """The rule a RecBole Config asks for."""
    return check(config.final_config_dict.get(KEY))


def is_sequential(config) -> bool:
    from recbole.utils import ModelType

    return config["MODEL_TYPE"] == ModelType.SEQUENTIAL


def user_items(dataset) -> dict[int, set[int]]:
    """Every item of each user in ``dataset``'s rows: a sequential dataset's rows also carry their
    history (the user's first item is only there), so its item lists are read as well (vectorised:
    ml-100k's ~99k training rows of 50 items in well under a second)."""
    uid, iid = dataset.uid_field, dataset.iid_field
    users = dataset.inter_feat[uid].numpy().astype(np.int64)
    pairs_u, pairs_i = [users], [dataset.inter_feat[iid].numpy().astype(np.int64)]
    seq_field = iid + dataset.config["LIST_SUFFIX"]
    if seq_field in dataset.inter_feat.interaction:
        histories = dataset.inter_feat[seq_field].numpy().astype(np.int64)  # [rows, max length], 0 = padding
        rows, cols = np.nonzero(histories)
        pairs_u.append(users[rows])
        pairs_i.append(histories[rows, cols])
    width = int(max(int(p.max(initial=0)) for p in pairs_i)) + 1
    keys = np.unique(np.concatenate(pairs_u) * width + np.concatenate(pairs_i))
    items: dict[int, set[int]] = {}
    for user, item in zip((keys // width).tolist(), (keys % width).tolist()):
        items.setdefault(user, set()).add(item)
    return items


def prepare(config, train_data, valid_data, test_data) -> None:
    """Give each full-ranking evaluation loader of a sequential model what :func:`collate_fn`
    masks: the items each user saw in the phases before the loader's (training for valid, training
    and valid for test). Nothing to do for a general model (RecBole's loader knows) or under
    ``keep``."""
    if rule(config) != "mask" or not is_sequential(config):
        return
    earlier = user_items(train_data._dataset)
    for loader in (valid_data, test_data):
        if loader is None:
            continue
        setattr(loader, _EARLIER, earlier)
        earlier = {u: set(v) for u, v in earlier.items()}  # the next phase also masks this one's items
        for user, items in user_items(loader._dataset).items():
            earlier.setdefault(user, set()).update(items)


def carry(source, target) -> None:
    """A loader built from another's rows (a sample of users) keeps its earlier phases' items."""
    if hasattr(source, _EARLIER):
        setattr(target, _EARLIER, getattr(source, _EARLIER))


def seen_rows(loader) -> list[torch.Tensor]:
    """Per row of the loader's dataset, the items to mask: the earlier phases' items of its user,
    its own history, and the targets of the user's earlier rows in this phase (rows are in time
    order per user), less the row's own target. [n_rows] of [n_seen]"""
    if getattr(loader, _ROWS, None) is None:
        dataset = loader._dataset
        earlier: dict[int, set[int]] = getattr(loader, _EARLIER, None) or {}
        uid, iid = dataset.uid_field, dataset.iid_field
        seq_field = iid + dataset.config["LIST_SUFFIX"]
        users = dataset.inter_feat[uid].numpy()
        targets = dataset.inter_feat[iid].numpy()
        histories = dataset.inter_feat[seq_field].numpy()
        so_far: dict[int, set[int]] = {}
        rows = []
        for user, target, history in zip(users.tolist(), targets.tolist(), histories):
            phase = so_far.setdefault(user, set())
            seen = earlier.get(user, set()) | phase | {int(i) for i in history if i}
            seen.discard(target)
            rows.append(torch.tensor(sorted(seen), dtype=torch.int64))
            phase.add(target)
        setattr(loader, _ROWS, rows)
    return getattr(loader, _ROWS)


def collate_fn(self, index):
    """RecBole's ``FullSortEvalDataLoader.collate_fn``, then the ``seen_items`` rule on its
    ``history_index`` (see the module docstring)."""
    from recbole.data.dataloader.general_dataloader import FullSortEvalDataLoader

    from recbole_llmgen.compat import original

    interaction, history_index, positive_u, positive_i = original(FullSortEvalDataLoader, "collate_fn")(self, index)
    chosen = rule(self.config)
    if chosen == "keep":
        return interaction, None, positive_u, positive_i
    if not self.is_sequential:
        return interaction, history_index, positive_u, positive_i  # RecBole's own: every earlier item
    rows = seen_rows(self)
    index = np.asarray(index).reshape(-1)
    if len(index) != len(positive_u):
        raise RuntimeError(
            f"seen_items: a transform changed the number of evaluation rows ({len(index)} -> {len(positive_u)}); "
            "set seen_items: keep for this model"
        )
    items = [rows[i] for i in index.tolist()]
    history_u = torch.cat([torch.full_like(seen, b) for b, seen in enumerate(items)])
    history_i = torch.cat(items)
    return interaction, (history_u, history_i), positive_u, positive_i


def data_preparation_hook(original_function):
    """RecBole's ``data_preparation``, then :func:`prepare` on the loaders it built."""
    import functools

    @functools.wraps(original_function)
    def data_preparation(config, dataset):
        train_data, valid_data, test_data = original_function(config, dataset)
        prepare(config, train_data, valid_data, test_data)
        return train_data, valid_data, test_data

    return data_preparation


_installed = False


def install() -> None:
    """Put the rule into RecBole's evaluation path (listed in :mod:`recbole_llmgen.patches`). Idempotent."""
    global _installed
    if _installed:
        return
    import recbole.data as data
    import recbole.data.utils as data_utils
    import recbole.quick_start.quick_start as quick_start
    from recbole.data.dataloader.general_dataloader import FullSortEvalDataLoader

    from recbole_llmgen.compat import replace

    replace(FullSortEvalDataLoader, "collate_fn", collate_fn)
    wrapped = data_preparation_hook(data_utils.data_preparation)
    for module in (data_utils, data, quick_start):
        replace(module, "data_preparation", wrapped)
    _installed = True
