"""Feedback files: the likes and dislikes of chat sessions, kept across sessions.

A feedback file is a RecBole atomic ``.inter`` file that :meth:`recbole_llmgen.Session.save_feedback`
appends to (``user_id, item_id, rating, timestamp, feedback_session``: 5 for a like, 1 for a
dislike; the session column marks it as ours, so a real dataset file given by mistake is refused,
never touched). :func:`read_feedback` gives the next session, ``recommend`` and a training run what
a user liked and disliked before.
"""

from __future__ import annotations

import os

import torch

from recbole_llmgen import seen_items

LIKE_RATING, DISLIKE_RATING = 5.0, 1.0
SESSION_COLUMN = "feedback_session:token"  # the column that marks a feedback file recbole-llmgen wrote


def check_feedback_file(path: str, header: str) -> bool:
    """True when ``path`` is new or empty (a header goes first), False when it is a feedback file
    with ``header`` (rows are appended); a named error for any other file, which is never touched."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return True
    if not os.path.isfile(path):
        raise ValueError(f"save-feedback: {path!r} is not a file")
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline().rstrip("\n")
    if SESSION_COLUMN not in first.split("\t"):
        raise ValueError(
            f"save-feedback: {path!r} is not a feedback file written by recbole-llmgen (its header has no "
            f"{SESSION_COLUMN} column: {first[:80]!r}); it is left as it was: choose another path"
        )
    if first != header:
        raise ValueError(
            f"save-feedback: {path!r} holds feedback with the columns {first!r}, this dataset's are {header!r}; "
            "choose another path"
        )
    return False


def _check_header(path: str, header: list[str], what: str) -> None:
    """A named error when ``header`` (the columns of ``path``) is not a feedback file's."""
    if SESSION_COLUMN not in header:
        raise ValueError(
            f"{what}: {path!r} is not a feedback file written by recbole-llmgen (no {SESSION_COLUMN} column)"
        )


def _events(paths, item_ids, what: str):
    """``(user, time, inner item id, rating)`` of every row of the feedback files ``paths``; a
    missing file, a file that is not a feedback file, or an item the dataset does not hold is a
    named error (``what`` says who asked)."""
    for path in [paths] if isinstance(paths, str) else list(paths or []):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            _check_header(path, f.readline().rstrip("\n").split("\t"), what)
            for number, line in enumerate(f, 2):
                who, item, rating, stamp, *_ = line.rstrip("\n").split("\t")
                if item not in item_ids:
                    raise ValueError(f"{what}: {path!r} line {number}: item {item!r} is not an item of this dataset")
                yield who, float(stamp), item_ids[item], float(rating)


def _verdicts(events) -> tuple[list[int], set[int]]:
    """``(liked, disliked)`` of one user's ``(time, item, rating)`` events: an item's last verdict counts."""
    liked: dict[int, None] = {}
    disliked: set[int] = set()
    for _, item, rating in sorted(events, key=lambda e: e[0]):
        if rating >= LIKE_RATING:
            liked[item] = None
            disliked.discard(item)
        else:
            disliked.add(item)
            liked.pop(item, None)
    return list(liked), disliked


def verdicts_by_user(paths, item_ids) -> dict[str, tuple[list[int], set[int]]]:
    """``{user token: (liked, disliked)}`` inner item ids in the feedback files ``paths`` (files
    :meth:`Session.save_feedback` wrote; a new user's rows under ``new-user``), read once; liked in
    time order, an item's last verdict counts (a like then a dislike: disliked). A file that is not
    a feedback file, or an item the dataset does not hold, is a named error."""
    per_user: dict[str, list[tuple[float, int, float]]] = {}
    for who, stamp, item, rating in _events(paths, item_ids, "feedback"):
        per_user.setdefault(who, []).append((stamp, item, rating))
    return {who: _verdicts(events) for who, events in per_user.items()}


def read_feedback(paths, user: str, item_ids) -> tuple[list[int], set[int]]:
    """``(liked, disliked)`` of ``user`` (a dataset user's token, or ``new-user``):
    :func:`verdicts_by_user` of that user."""
    return verdicts_by_user(paths, item_ids).get(user, ([], set()))


# --- feedback that teaches: `feedback` config key (run/benchmark --feedback FILE...)

KEY = "feedback"
USED = "llmgen_feedback"  # training dataset attribute: what the feedback added (feedback_counts)


def check_config(value) -> list[str] | None:
    """The ``feedback`` config key as a list of feedback files (None when unset); a path that does
    not exist or is not a feedback file written by recbole-llmgen is a named error."""
    if value is None or value == [] or value == "":
        return None
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, str) and p for p in paths):
        raise ValueError(
            f"feedback: {value!r} is not a feedback file or a list of them (files chat --save-feedback wrote)"
        )
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"feedback: {path!r} does not exist (the files chat --save-feedback wrote)")
        with open(path, encoding="utf-8", errors="replace") as f:
            _check_header(path, f.readline().rstrip("\n").split("\t"), "feedback")
    return [str(p) for p in paths]


def with_trained(feedback, config) -> list[str]:
    """``feedback`` (files given now) plus the files the model was trained on (its ``feedback``
    key) that still exist: a model that learnt from feedback knows what was liked and disliked."""
    given = [feedback] if isinstance(feedback, str) else list(feedback or [])
    trained = config[KEY] if KEY in config else None
    return [*given, *(p for p in trained or [] if p not in given and os.path.isfile(p))]


def training_likes(paths, dataset, known: dict[int, set[int]]) -> tuple[dict[int, list[int]], dict[str, int]]:
    """The liked items of the feedback files that become training interactions: ``{inner user:
    [inner items, in time order]}``, and the counts of every row (``feedback_rows``: likes used;
    ``feedback_dislikes``, ``feedback_new_users``, ``feedback_known``: rows left out). A user the
    dataset does not hold has no place in its split (left out); an item the user already
    interacted with (``known``: in any split) is not added twice; dislikes are never trained on
    (RecBole's objectives here take positives only; their negatives are sampled)."""
    users = dataset.field2token_id[dataset.uid_field]
    counts = {"feedback_rows": 0, "feedback_dislikes": 0, "feedback_new_users": 0, "feedback_known": 0}
    likes: dict[int, list[int]] = {}
    for who, (liked, disliked) in verdicts_by_user(paths, dataset.field2token_id[dataset.iid_field]).items():
        counts["feedback_dislikes"] += len(disliked)
        if who not in users:
            counts["feedback_new_users"] += len(liked)
            continue
        user = users[who]
        fresh = [i for i in liked if i not in known.get(user, ())]
        counts["feedback_known"] += len(liked) - len(fresh)
        counts["feedback_rows"] += len(fresh)
        if fresh:
            likes[user] = fresh
    return likes, counts


def with_likes(train, likes: dict[int, list[int]]):
    """A copy of the training dataset ``train`` with one interaction per liked item appended after
    the user's last training row (so the split's valid and test items stay the user's last ones).
    Each new row copies the user's last training row (its normalised time, other fields), with the
    liked item as target and the split's highest rating; a sequential dataset's row also carries
    the history: the last row's items, its target, and the earlier likes."""
    from recbole.data.interaction import Interaction, cat_interactions

    inter, config = train.inter_feat, train.config
    users = inter[train.uid_field].numpy()
    last = {int(u): i for i, u in enumerate(users.tolist())}  # rows are in time order within a user
    fields = list(inter.interaction)
    suffix, length_field = config["LIST_SUFFIX"], config["ITEM_LIST_LENGTH_FIELD"]
    listed = [f for f in fields if f + suffix in inter.interaction]  # sequential: the fields with a history list
    rating = config["RATING_FIELD"]
    top = inter[rating].max() if rating in inter.interaction else None
    rows = []
    for user, items in likes.items():
        if user not in last:  # no training row to continue (a user whose items are all valid/test)
            continue
        row = {f: inter[f][last[user]].clone() for f in fields}
        for item in items:
            nxt = {f: v.clone() for f, v in row.items()}
            if listed:
                n = int(row[length_field])
                width = row[train.iid_field + suffix].shape[0]
                for f in listed:
                    seq = torch.cat([row[f + suffix][:n], row[f].view(1).to(row[f + suffix].dtype)])[-width:]
                    nxt[f + suffix] = torch.zeros_like(row[f + suffix])
                    nxt[f + suffix][: len(seq)] = seq
                nxt[length_field] = torch.tensor(min(n + 1, width), dtype=row[length_field].dtype)
            nxt[train.iid_field] = torch.tensor(item, dtype=row[train.iid_field].dtype)
            if top is not None:
                nxt[rating] = top.clone()
            rows.append(nxt)
            row = nxt
    if not rows:
        return train
    added = Interaction({f: torch.stack([r[f] for r in rows]) for f in fields})
    return train.copy(cat_interactions([inter, added]))


def build_hook(original_build):
    """RecBole's ``Dataset.build``; with the ``feedback`` key set, the liked items of the feedback
    files join the training split (:func:`with_likes`), never valid or test; what was used is the
    training dataset's ``llmgen_feedback`` and a log line."""
    import functools

    @functools.wraps(original_build)
    def build(self):
        built = original_build(self)
        paths = self.config[KEY] if KEY in self.config else None
        if not paths:
            return built
        gone = [p for p in paths if not os.path.isfile(p)]
        if gone:  # checked when the Config was built: a model loaded later still loads without them
            self.logger.warning(f"feedback: {gone} no longer exist; the training split is built without them")
            paths = [p for p in paths if p not in gone]
            if not paths:
                return built
        known: dict[int, set[int]] = {}  # every item of each user, in any split
        for part in built:
            for user, items in seen_items.user_items(part).items():
                known.setdefault(user, set()).update(items)
        likes, counts = training_likes(paths, self, known)
        added = with_likes(built[0], likes)
        used = len(added.inter_feat) - len(built[0].inter_feat)
        counts["feedback_known"] += counts["feedback_rows"] - used  # users with no training row to continue
        counts["feedback_rows"] = used
        setattr(added, USED, counts)
        self.logger.info(f"feedback {', '.join(paths)}: {counts}")
        return [added, *built[1:]]

    return build


_installed = False


def install() -> None:
    """Feedback into RecBole's split (listed in :mod:`recbole_llmgen.patches`). Idempotent."""
    global _installed
    if _installed:
        return
    from recbole.data.dataset import Dataset

    from recbole_llmgen.compat import replace

    replace(Dataset, "build", build_hook(Dataset.build))
    _installed = True
