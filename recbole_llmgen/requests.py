"""Recommendations for a request in the user's own words (and chat feedback): one ranking.

:func:`rank_for_request` is the one ranking: candidates from the model's ``candidate_source``
(popularity for a user without history), widened by a request retriever (sentence-embedding
similarity of the request to each item's description: its text plus its other .item fields, e.g.
genres) and by the neighbours of items the user wants "more like"; the LLM scores them with the
request in the prompt; the final score is ``(1 - request_weight) x z(LLM) + request_weight x
z(similarity)`` within the list (z: standardized). Seen, disliked and already shown items are never
candidates. :func:`score_requests` does it for many users at once (``recommend --request``, the
request benchmark); :class:`recbole_llmgen.conversation.Session` keeps one user's feedback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recbole_llmgen import candidates as cand


def _masked(scores: torch.Tensor, blocked) -> torch.Tensor:
    """``scores`` with padding and ``blocked`` items at -inf (candidates.mask_seen, one row). [n_items]"""
    return cand.mask_seen(scores[None], [sorted(blocked)])[0]


def top_items(scores: torch.Tensor, k: int, blocked=()) -> list[int]:
    """The ``k`` best items that may be proposed (ties to the lower id), best first."""
    masked = _masked(scores.float(), blocked)
    return [i for i in cand.top_candidates(masked[None], k)[0].tolist() if masked[i] > -math.inf]


def _z(values: torch.Tensor) -> torch.Tensor:
    return cand.standardize(values.double()[None])[0]


def base_retrieval(model, history: list[int], user: int | None) -> torch.Tensor:
    """The candidate source's scores for one user (popularity when there is no history). [n_items]"""
    if not history or (user is None and model.settings.candidate_kind != "builtin"):
        return model.retriever.item_counts.float()
    from recbole.data.interaction import Interaction

    seq = torch.zeros(1, model.max_seq_length, dtype=torch.long)
    recent = history[-model.max_seq_length :]
    seq[0, : len(recent)] = torch.tensor(recent)
    fields = {model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: torch.tensor([len(recent)])}
    if user is not None:
        fields[model.USER_ID] = torch.tensor([user])
    interaction = Interaction(fields).to(model.device)
    return model.retriever.scores(interaction, mask=False)[0].cpu()


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
    focuses = focuses or (model.settings.request_focus,)
    asked_texts = sorted({r for r in requests if r is not None})
    queries = dict(zip(asked_texts, model.retriever.encode(["", *asked_texts])[1:])) if asked_texts else {}
    steering = any(steers) or any(avoids)
    described = model.retriever.description_embeddings() if asked_texts or steering else None
    k = model.settings.num_candidates
    # seen, excluded (disliked, shown) items: never candidates, never generated
    blocked_sets = [{*model.retriever.seen(u, h), *x} for u, h, x in zip(users, histories, excludes)]
    generated = None
    if model.settings.score_method == "generate":  # the items beam search reaches (with the request) join the pool
        generated = model.generator.items(histories, requests, [sorted(b) for b in blocked_sets])
    pools, bases, asks = [], [], []
    for b, (history, request, user, blocked, steer, avoid) in enumerate(
        zip(histories, requests, users, blocked_sets, steers, avoids)
    ):
        base = _z_catalogue(model.retriever.candidate_side(base_retrieval(model, history, user)), blocked)
        pool = top_items(base, k, blocked)
        if generated is not None:
            pool += [i for i, _ in generated[b]][:k]  # none of them blocked: the search skips them
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
                pool += top_items(base + focus * asked, k, blocked)
        pools.append(sorted(set(pool)))
        bases.append(base)
        asks.append(asked)
    todo = [b for b in range(n) if pools[b] and (llm_for_requests or asks[b] is None)]
    for b in set(range(n)) - set(todo):  # not scored, still a prompt for explanations: it must fit the context
        if requests[b] is not None:
            model.prompts.build(histories[b], reserve_tokens=model.settings.max_item_text_tokens, request=requests[b])
    scores = (
        model.scorer.score(
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
        llm_for_requests=model.settings.request_weight < 1,
    )[0]  # fmt: skip
    return scored.ranked(model.settings.request_weight, model.settings.request_focus, topk)
