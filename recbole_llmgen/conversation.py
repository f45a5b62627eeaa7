"""Recommendations for a request in the user's own words, refined by feedback in a session.

:func:`rank_for_request` is the one ranking: candidates from the model's ``candidate_source``
(popularity for a user without history), widened by a request retriever (sentence-embedding
similarity of the request to each item's description: its text plus its other .item fields, e.g.
genres) and by the neighbours of items the user wants "more like"; the LLM scores them with the
request in the prompt; the final score is ``(1 - request_weight) x z(LLM) + request_weight x
z(similarity)`` within the list (z: standardized). Seen, disliked and already shown items are never
candidates.

:class:`Session` keeps what one user said: the request, liked items (they join the history the
prompt shows), disliked and shown items (excluded), "more like" items (steer the candidates) and
"not this kind" lists (steer away). ``recbole-llmgen chat`` is a thin shell over
:meth:`Session.handle`. Feedback can be written as RecBole atomic interactions
(:meth:`Session.save_feedback`), so fine-tuning can learn from it.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field

import torch

from recbole_llmgen import candidates as cand
from recbole_llmgen.text import CHAT_COMMANDS as COMMANDS
from recbole_llmgen.text import CHAT_HELP as HELP

LIKE_RATING, DISLIKE_RATING = 5.0, 1.0


def item_descriptions(model) -> list[str]:
    """Each item's text plus its other token fields (e.g. ml-100k's genres), for the request retriever."""
    dataset = model._candidate_dataset
    texts = list(model.item_texts)
    feat = dataset.item_feat
    if feat is None:
        return texts
    extra = [f for f in feat.columns if f != model.ITEM_ID and dataset.field2type[f].name in ("TOKEN", "TOKEN_SEQ")]
    columns = [model._field_strings(dataset, f) for f in extra]
    described = [""]
    for i in range(1, len(texts)):
        parts = [v for v in (column[i] for column in columns) if v and v not in texts[i]]
        described.append(texts[i] + (". " + ", ".join(parts) if parts else ""))
    return described


def description_embeddings(model) -> torch.Tensor:
    """Sentence embeddings of :func:`item_descriptions`, computed once per model. [n_items, d]"""
    if getattr(model, "_description_embeddings", None) is None:
        model._description_embeddings = cand.encode_texts(model.text_encoder_path, item_descriptions(model))
    return model._description_embeddings


def _masked(scores: torch.Tensor, blocked) -> torch.Tensor:
    """``scores`` with padding and ``blocked`` items at -inf (candidates.mask_seen, one row). [n_items]"""
    return cand.mask_seen(scores[None], [sorted(blocked)])[0]


def _top(scores: torch.Tensor, k: int, blocked=()) -> list[int]:
    """The ``k`` best items that may be proposed (ties to the lower id), best first."""
    masked = _masked(scores.float(), blocked)
    return [i for i in cand.top_candidates(masked[None], k)[0].tolist() if masked[i] > -math.inf]


def _z(values: torch.Tensor) -> torch.Tensor:
    return cand.standardize(values.double()[None])[0]


def base_retrieval(model, history: list[int], user: int | None) -> torch.Tensor:
    """The candidate source's scores for one user (popularity when there is no history). [n_items]"""
    if not history or (user is None and model.candidate_kind != "builtin"):
        return model.item_counts.float()
    from recbole.data.interaction import Interaction

    seq = torch.zeros(1, model.max_seq_length, dtype=torch.long)
    recent = history[-model.max_seq_length :]
    seq[0, : len(recent)] = torch.tensor(recent)
    fields = {model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: torch.tensor([len(recent)])}
    if user is not None:
        fields[model.USER_ID] = torch.tensor([user])
    interaction = Interaction(fields).to(model.device)
    return model.retrieval_scores(seq, fields[model.ITEM_SEQ_LEN], interaction, mask=False)[0].cpu()


@dataclass
class Scored:
    """One user's candidates: the LLM's scores, and the candidate source's and the request's (plus
    steering) scores, each standardized over the whole catalogue (unseen items)."""

    candidates: list[int]
    llm: torch.Tensor  # [K]
    base: torch.Tensor  # [K] z-score of the candidate source's score
    asked: torch.Tensor | None  # [K] z-score of the request / steering similarity; None: nothing asked

    def ranked(self, weight: float, focus: float, topk: int) -> list[tuple[int, float]]:
        """(item, score) best first: ``(1 - weight) x z(LLM) + weight x z(base + focus x asked)``
        within the list, ties to the lower id. Without a request: the LLM's order."""
        score = _z(self.llm) if len(self.candidates) else self.llm
        if self.asked is not None and weight > 0 and len(self.candidates):
            score = (1 - weight) * score + weight * _z(self.base + focus * self.asked)
        order = sorted(range(len(self.candidates)), key=lambda j: (-float(score[j]), self.candidates[j]))
        return [(self.candidates[j], float(score[j])) for j in order[:topk]]


def _z_catalogue(values: torch.Tensor, blocked: set[int]) -> torch.Tensor:
    """Standardized over the items that may be proposed (padding and ``blocked`` at -inf). [n_items]"""
    return _z(_masked(values.double(), blocked))


@torch.no_grad()
def score_requests(
    model,
    histories: list[list[int]],
    requests: list[str | None],
    users: list[int | None],
    excludes: list[set[int]] | None = None,
    steers: list[list[int]] | None = None,
    avoids: list[list[int]] | None = None,
    focuses: tuple[float, ...] | None = None,
    llm_for_requests: bool = True,
) -> list[Scored]:
    """:class:`Scored` lists for several users (the LLM scores them in shared passes;
    ``llm_for_requests=False``: not for users with a request or steering, whose order
    ``request_weight`` 1 leaves to the retriever: their LLM scores are zeros).

    The candidates: the candidate source's top ``num_candidates``, and for a request the top
    ``num_candidates`` of the request-aware retriever ``z(source) + focus x z(similarity)`` for
    each ``focus`` (default: the model's ``request_focus``)."""
    model.eval()
    n = len(histories)
    excludes, steers, avoids = excludes or [set()] * n, steers or [[]] * n, avoids or [[]] * n
    focuses = focuses or (model.request_focus,)
    asked_texts = sorted({r for r in requests if r is not None})
    queries = (
        dict(zip(asked_texts, cand.encode_texts(model.text_encoder_path, ["", *asked_texts])[1:]))
        if asked_texts
        else {}
    )
    steering = any(steers) or any(avoids)
    described = description_embeddings(model) if asked_texts or steering else None
    k = model.num_candidates
    # score_method generate: the items constrained beam search reaches (with the request) join the pool
    generated = model.generate_items_batch(histories, requests) if model.score_method == "generate" else None
    pools, bases, asks = [], [], []
    for b, (history, request, user, exclude, steer, avoid) in enumerate(
        zip(histories, requests, users, excludes, steers, avoids)
    ):
        blocked = set(history) | set(exclude) | set(model.training_items.get(user, []) if user is not None else [])
        base = _z_catalogue(model.candidate_side(base_retrieval(model, history, user)), blocked)
        pool = _top(base, k, blocked)
        if generated is not None:
            pool += [i for i, _ in generated[b] if i not in blocked][:k]
        similarities = []
        if request is not None:
            similarities.append(described @ queries[request])
        if steer:
            similarities.append(cand.text_scores(described, [list(steer)])[0])
        if avoid:
            similarities.append(-cand.text_scores(described, [list(avoid)])[0])
        asked = None
        if similarities:
            asked = torch.stack([_z_catalogue(s, blocked) for s in similarities]).mean(dim=0)
            for focus in focuses:
                pool += _top(base + focus * asked, k, blocked)
        pools.append(sorted(set(pool)))
        bases.append(base)
        asks.append(asked)
    todo = [b for b in range(n) if pools[b] and (llm_for_requests or asks[b] is None)]
    for b in set(range(n)) - set(todo):  # not scored, still a prompt for explanations: it must fit the context
        if requests[b] is not None:
            model.build_prompt(histories[b], reserve_tokens=model.max_item_text_tokens, request=requests[b])
    scores = (
        model.score_candidates_batch(
            [histories[b] for b in todo],
            [pools[b] for b in todo],
            [users[b] or 0 for b in todo],
            [requests[b] for b in todo],
        )
        if todo
        else []
    )
    llm = dict(zip(todo, scores))
    results = []
    for b in range(n):
        ids = torch.tensor(pools[b], dtype=torch.long)
        asked = asks[b][ids] if asks[b] is not None else None
        results.append(Scored(pools[b], llm.get(b, torch.zeros(len(pools[b]))), bases[b][ids], asked))
    return results


def rank_for_request(
    model,
    history: list[int],
    request: str | None = None,
    user: int | None = None,
    exclude: set[int] | frozenset = frozenset(),
    steer: list[int] | tuple = (),
    avoid: list[int] | tuple = (),
    topk: int = 10,
) -> list[tuple[int, float]]:
    """The ``topk`` best (item, score) for a history (inner ids, oldest first; may be empty) and a
    request, best first; see the module docstring. Same inputs, same list (no sampling)."""
    scored = score_requests(
        model, [history], [request], [user], [set(exclude)], [list(steer)], [list(avoid)],
        llm_for_requests=model.request_weight < 1,
    )[0]  # fmt: skip
    return scored.ranked(model.request_weight, model.request_focus, topk)


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
            from recbole_llmgen.recommend import _histories

            self.user_id = known[self.user]
            self.history = _histories(full, [self.user_id], uid, iid, config["TIME_FIELD"])[self.user_id]
        self.request: str | None = None
        self.liked: list[int] = []
        self.disliked: set[int] = set()
        self.shown: set[int] = set()
        self.steer: list[int] = []
        self.avoid: list[int] = []
        self.last: list[tuple[int, float]] = []
        self.events: list[tuple[int, float, int]] = []  # (item, rating, timestamp)
        self.feedback_path: str | None = None

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
    ) -> Session:
        """Load the model (a saved checkpoint, or a config) once and start a session for ``user``."""
        from recbole_llmgen.recommend import _load

        config, rec, full = _load(model, dataset, config_file_list, config_dict, model_file)
        session = cls(rec, full, config, user=user, topk=topk, explain=explain)
        description_embeddings(rec)  # the catalogue's embeddings once, at start-up, not in the first answer
        return session

    # ------------------------------------------------------------------ the loop
    def ask(self, request: str) -> list[dict]:
        """A new list for ``request`` (what was liked, disliked and shown so far still counts)."""
        from recbole_llmgen import text

        text.request_line(self.model.request_template, request)  # empty: a named error
        words = " ".join(str(request).split())
        rows = self._next_list(words)  # a request that fails (too long) leaves the session as it was
        self.request = words
        return rows

    def feedback(self, line: str) -> list[dict]:
        """Apply one feedback line (``like 3``, ``dislike 5``, ``more like 2``, ``not this kind``)
        to the last list and return the next list."""
        words = line.lower().split()
        if not self.last:
            raise ValueError("feedback: there is no list yet; type a request first")
        if words == ["not", "this", "kind"]:
            self.avoid.extend(i for i, _ in self.last)
            return self._next_list()
        kind, number = self._parse(words)
        item = self.last[number - 1][0]
        if kind == "like":
            self.liked.append(item)
            self.disliked.discard(item)
            self._record(item, LIKE_RATING)
        elif kind == "dislike":
            self.disliked.add(item)
            self._record(item, DISLIKE_RATING)
        else:
            self.steer.append(item)
        return self._next_list()

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
    def save_feedback(self, path: str) -> str:
        """Write the likes and dislikes so far as RecBole atomic interactions (rating 5 for a like,
        1 for a dislike; keep only likes with ``val_interval: {rating: "[4,inf)"}``); returns the path.
        A new user is written as ``new-user``. Rewritten whole each time (a temporary file, then a rename)."""
        uid, iid = self.config["USER_ID_FIELD"], self.config["ITEM_ID_FIELD"]
        rating = self.config["RATING_FIELD"] or "rating"
        stamp = self.config["TIME_FIELD"] or "timestamp"
        from recbole_llmgen.recommend import NEW_USER

        user = self.user if self.user is not None else NEW_USER
        lines = [f"{uid}:token\t{iid}:token\t{rating}:float\t{stamp}:float"]
        lines += [f"{user}\t{self.item_tokens[i]}\t{r:g}\t{t}" for i, r, t in self.events]
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
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
        if self.feedback_path:
            self.save_feedback(self.feedback_path)

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
        self.last = pairs
        self.shown.update(i for i, _ in pairs)
        rows = []
        for rank, (item, score) in enumerate(pairs, start=1):
            row = {"rank": rank, "item_id": str(self.item_tokens[item]), "item_text": self.model.item_texts[item],
                   "score": score, "explanation": ""}  # fmt: skip
            if self.explain:
                from recbole_llmgen.recommend import explain_item

                row["explanation"] = explain_item(self.model, self.prompt_history(), item, request=request)
            rows.append(row)
        return rows


def format_rows(rows: list[dict]) -> str:
    """A numbered list: title, score, and the explanation when there is one."""
    lines = []
    for row in rows:
        lines.append(f"{row['rank']:>3}. {row['item_text']}  [item {row['item_id']}, score {row['score']:.3f}]")
        if row.get("explanation"):
            lines.append(f"       why: {row['explanation']}")
    return "\n".join(lines) if lines else "(no items left to propose)"
