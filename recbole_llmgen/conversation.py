"""A conversation: one user's requests in their own words, refined by feedback.

:class:`Session` keeps what one user said: the request, liked items (they join the history the
prompt shows), disliked and shown items (excluded), "more like" items (steer the candidates) and
"not this kind" lists (steer away). ``recbole-llmgen chat`` is a thin shell over
:meth:`Session.handle`. Feedback can be written as RecBole atomic interactions
(:meth:`Session.save_feedback`), so fine-tuning can learn from it.
"""

from __future__ import annotations

import copy
import os
import re
import time
import uuid
from dataclasses import dataclass, field

from recbole_llmgen import text
from recbole_llmgen.feedback import (
    DISLIKE_RATING,
    LIKE_RATING,
    SESSION_COLUMN,
    check_feedback_file,
    read_feedback,
    with_trained,
)
from recbole_llmgen.integration import load_model, user_histories
from recbole_llmgen.recommend import NEW_USER, explain_item
from recbole_llmgen.requests import rank_for_request
from recbole_llmgen.text import CHAT_COMMANDS as COMMANDS
from recbole_llmgen.text import CHAT_HELP as HELP


@dataclass
class Reply:
    """What the session says to one line: a message, the new list (rows) or nothing, and whether it ended."""

    message: str = ""
    rows: list[dict] = field(default_factory=list)
    done: bool = False


class Session:
    """One user's conversation with a loaded LLMGen (``model``) over its dataset (``full``)."""

    def __init__(self, model, full, config, user: str | None = None, topk: int = 10, explain: bool = False):
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk: expected an integer >= 1, got {topk!r}")
        self.model, self.full, self.config = model, full, config
        self.topk, self.explain = topk, explain
        uid, iid = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
        self.item_tokens = full.field2id_token[iid]
        self.item_ids = full.field2token_id[iid]
        self.user = None if user is None else str(user)
        self.user_id = None
        self.history: list[int] = []
        if self.user is not None:
            known = full.field2token_id[uid]
            if self.user not in known:
                sample = ", ".join(list(known)[1:6])
                raise ValueError(
                    f"user: {self.user!r} is not a user of {config['dataset']!r} (e.g. {sample}); "
                    "leave it out to start as a new user"
                )
            self.user_id = known[self.user]
            self.history = user_histories(full, [self.user_id], uid, iid, config["TIME_FIELD"])[self.user_id]
        self.request: str | None = None
        self.liked: list[int] = []
        self.disliked: set[int] = set()
        self.shown: set[int] = set()
        self.steer: list[int] = []
        self.avoid: list[int] = []
        self.last: list[tuple[int, float]] = []
        self.events: list[tuple[int, float, int]] = []  # (item, rating, timestamp)
        self.feedback_path: str | None = None
        self.session_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"  # stamps this session's rows
        self.appended: dict[str, int] = {}  # path -> events of this session already appended there

    @classmethod
    def open(
        cls,
        dataset: str | None = None,
        user: str | None = None,
        model_file: str | None = None,
        config_file_list: list[str] | None = None,
        config_dict: dict | None = None,
        topk: int = 10,
        explain: bool = False,
        model: str = "LLMGen",
        feedback: list[str] | None = None,
    ) -> Session:
        """Load the model (a saved checkpoint, or a config) once and start a session for ``user``.
        ``feedback``: feedback files of earlier sessions (:func:`read_feedback`): the user's liked
        items join the history the prompt shows, disliked ones are never proposed (a new user's
        feedback, rows of ``new-user``, builds their history from nothing); a model trained with
        ``feedback`` files (``run --feedback``) adds those that still exist."""
        config, rec, full = load_model(model, dataset, config_file_list, config_dict, model_file)
        session = cls(rec, full, config, user=user, topk=topk, explain=explain)
        feedback = with_trained(feedback, config)  # and the feedback the model was trained on
        if feedback:
            liked, disliked = read_feedback(feedback, session.user or NEW_USER, session.item_ids)
            session.history = [*session.history, *[i for i in liked if i not in session.history]]
            session.disliked |= disliked
        rec.retriever.description_embeddings()  # the catalogue's embeddings once, at start-up, not in the first answer
        return session

    # ------------------------------------------------------------------ the loop
    def ask(self, request: str) -> list[dict]:
        """A new list for ``request`` (what was liked, disliked and shown so far still counts)."""
        text.request_line(self.model.settings.request_template, request)  # empty: a named error
        words = " ".join(str(request).split())
        rows = self._next_list(words)  # a request that fails (too long) leaves the session as it was
        self.request = words
        return rows

    def feedback(self, line: str) -> list[dict]:
        """Apply one feedback line (``like 3``, ``dislike 5``, ``more like 2``, ``not this kind``)
        to the last list and return the next list. When the next list fails, the session is left as
        it was and the feedback file is not written."""
        words = line.lower().split()
        if not self.last:
            raise ValueError("feedback: there is no list yet; type a request first")
        kind, number = ("not", 0) if words == ["not", "this", "kind"] else self._parse(words)
        saved = copy.deepcopy(self._state())
        item = self.last[number - 1][0] if number else None
        if kind == "not":
            self.avoid.extend(i for i, _ in self.last)
        elif kind == "like":
            self.liked.append(item)
            self.disliked.discard(item)
            self._record(item, LIKE_RATING)
        elif kind == "dislike":
            self.disliked.add(item)
            self._record(item, DISLIKE_RATING)
        else:
            self.steer.append(item)
        try:
            rows = self._next_list()
        except Exception:
            self.__dict__.update(saved)
            raise
        if self.feedback_path and kind in ("like", "dislike"):
            self.save_feedback(self.feedback_path)
        return rows

    def why(self, number: int) -> str:
        """The LLM's explanation of item ``number`` (1-based) of the last list."""
        if not self.last:
            raise ValueError("why: there is no list yet; type a request first")
        if not 1 <= number <= len(self.last):
            raise ValueError(f"why: needs a number on the list (1..{len(self.last)}), got {number}")
        item = self.last[number - 1][0]
        because = explain_item(self.model, self.prompt_history(), item, request=self.request)
        return f"{self.model.item_texts[item]}: {because}"

    def handle(self, line: str) -> Reply:
        """One line typed by the user: a command, feedback or a new request. Mistakes give a
        one-line message and change nothing."""
        words = line.strip().lower().split()
        if not words:
            return Reply("request: empty; " + HELP)
        if words[0] in ("quit", "exit", "q"):
            return Reply("bye", done=True)
        if words[0] in ("help", "?"):
            return Reply(HELP)
        try:
            if words[0] in ("why", "explain") and len(words) == 2:
                if not re.fullmatch(r"\d+", words[1]):
                    raise ValueError(f"{words[0]}: needs a number on the list, got {words[1]!r}")
                return Reply(self.why(int(words[1])))
            if words[0] in ("like", "dislike") or words[:2] == ["more", "like"] or words == ["not", "this", "kind"]:
                before = self._feedback_message(words)
                rows = self.feedback(line)
                return Reply(before, rows)
            if len(words) == 2 and words[1].isdigit():
                return Reply(f"unknown command {words[0]!r}; commands: {COMMANDS}; anything else is a new request")
            return Reply("", self.ask(line))
        except ValueError as error:
            return Reply(str(error))

    # ------------------------------------------------------------------ feedback file
    def feedback_header(self) -> str:
        """The header of this dataset's feedback file: RecBole atomic columns plus the session column
        that marks a file as one recbole-llmgen wrote."""
        uid, iid = self.config["USER_ID_FIELD"], self.config["ITEM_ID_FIELD"]
        rating = self.config["RATING_FIELD"] or "rating"
        stamp = self.config["TIME_FIELD"] or "timestamp"
        return f"{uid}:token\t{iid}:token\t{rating}:float\t{stamp}:float\t{SESSION_COLUMN}"

    def save_feedback(self, path: str) -> str | None:
        """Append this session's likes and dislikes not yet saved there to ``path`` as RecBole atomic interactions (rating
        5 for a like, 1 for a dislike, each row stamped with its time and this session's id; a new
        user is written as ``new-user``); returns the path, or None when nothing was said (nothing is
        written). Earlier sessions' rows stay: a file that is not a feedback file of this dataset's
        columns is refused by name (:func:`check_feedback_file`) and left as it was."""
        if not self.events:
            return None
        key = os.path.abspath(path)
        new = self.events[self.appended.get(key, 0) :]  # saving after every like: each event once
        if new:
            header = self.feedback_header()
            fresh = check_feedback_file(path, header)
            user = self.user if self.user is not None else NEW_USER
            lines = [header] if fresh else []
            lines += [f"{user}\t{self.item_tokens[i]}\t{r:g}\t{t}\t{self.session_id}" for i, r, t in new]
            os.makedirs(os.path.dirname(key), exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            self.appended[key] = len(self.events)
        return path

    # ------------------------------------------------------------------ internals
    def _parse(self, words: list[str]) -> tuple[str, int]:
        kind = "more" if words[:2] == ["more", "like"] else words[0]
        rest = words[2:] if kind == "more" else words[1:]
        shown = len(self.last)
        if len(rest) != 1 or not re.fullmatch(r"\d+", rest[0]) or not 1 <= int(rest[0]) <= shown:
            given = " ".join(rest) or "nothing"
            name = "more like" if kind == "more" else kind
            raise ValueError(f"feedback: {name} needs a number on the list (1..{shown}), got {given!r}")
        return kind, int(rest[0])

    def _feedback_message(self, words: list[str]) -> str:
        if words == ["not", "this", "kind"] or not self.last:
            return "steering away from the last list" if self.last else ""
        kind, number = self._parse(words)
        title = self.model.item_texts[self.last[number - 1][0]]
        return {
            "like": f"liked: {title} (added to your history)",
            "dislike": f"disliked: {title} (not proposed again)",
            "more": f"more like: {title}",
        }[kind]

    def _record(self, item: int, rating: float) -> None:
        last = self.events[-1][2] if self.events else 0
        self.events.append((item, rating, max(int(time.time()), last + 1)))

    def _state(self) -> dict:
        """What feedback changes (restored when the next list fails)."""
        keys = ("liked", "disliked", "shown", "steer", "avoid", "last", "events")
        return {key: self.__dict__[key] for key in keys}

    def prompt_history(self) -> list[int]:
        """The history the prompt shows: the user's interactions, then the items liked in this session."""
        return [*self.history, *[i for i in self.liked if i not in self.history]]

    def _next_list(self, request: str | None = None) -> list[dict]:
        request = request if request is not None else self.request
        if request is None and not self.steer:
            raise ValueError("request: none yet; type what you would like first")
        pairs = rank_for_request(
            self.model,
            self.prompt_history(),
            request,
            self.user_id,
            exclude=self.disliked | self.shown | set(self.liked),
            steer=self.steer,
            avoid=self.avoid,
            topk=self.topk,
        )
        rows = []
        for rank, (item, score) in enumerate(pairs, start=1):
            row = {"rank": rank, "item_id": str(self.item_tokens[item]), "item_text": self.model.item_texts[item],
                   "score": score, "explanation": ""}  # fmt: skip
            if self.explain:
                row["explanation"] = explain_item(self.model, self.prompt_history(), item, request=request)
            rows.append(row)
        self.last = pairs  # only a list that was built in full changes the session
        self.shown.update(i for i, _ in pairs)
        return rows


def format_rows(rows: list[dict]) -> str:
    """A numbered list: title, score, and the explanation when there is one."""
    lines = []
    for row in rows:
        lines.append(f"{row['rank']:>3}. {row['item_text']}  [item {row['item_id']}, score {row['score']:.3f}]")
        if row.get("explanation"):
            lines.append(f"       why: {row['explanation']}")
    return "\n".join(lines) if lines else "(no items left to propose)"
