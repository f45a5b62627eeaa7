"""Feedback files: the likes and dislikes of chat sessions, kept across sessions.

A feedback file is a RecBole atomic ``.inter`` file that :meth:`recbole_llmgen.Session.save_feedback`
appends to (``user_id, item_id, rating, timestamp, feedback_session``: 5 for a like, 1 for a
dislike; the session column marks it as ours, so a real dataset file given by mistake is refused,
never touched). :func:`read_feedback` gives the next session, ``recommend`` and a training run what
a user liked and disliked before.
"""

from __future__ import annotations

import os

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


def read_feedback(paths, user: str, item_ids) -> tuple[list[int], set[int]]:
    """``(liked, disliked)`` inner item ids of ``user`` (a dataset user's token, or ``new-user``) in
    the feedback files ``paths`` (files :meth:`Session.save_feedback` wrote), in time order; an item's
    last verdict counts (a like then a dislike: disliked). A file that is not a feedback file, or an
    item the dataset does not hold, is a named error."""
    events = []
    for path in [paths] if isinstance(paths, str) else list(paths or []):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"feedback: {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            header = f.readline().rstrip("\n").split("\t")
            if SESSION_COLUMN not in header:
                raise ValueError(
                    f"feedback: {path!r} is not a feedback file written by recbole-llmgen (no {SESSION_COLUMN} column)"
                )
            for number, line in enumerate(f, 2):
                who, item, rating, stamp, *_ = line.rstrip("\n").split("\t")
                if who != user:
                    continue
                if item not in item_ids:
                    raise ValueError(f"feedback: {path!r} line {number}: item {item!r} is not an item of this dataset")
                events.append((float(stamp), item_ids[item], float(rating)))
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
