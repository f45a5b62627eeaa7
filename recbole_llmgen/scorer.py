"""The LLM's score of each user's candidate items: prompts from a :class:`~recbole_llmgen.prompts.Prompter`,
packed passes from :mod:`recbole_llmgen.scoring`, and a cache that lives only as long as it is asked for.

``score_method: likelihood`` (and ``generate``, whose beam score is the same number): the mean
log-probability of each candidate's tokens after the prompt. ``verbalizer``: the candidates listed
with letters, the next-token log-probabilities of the letters, averaged over
``verbalizer_permutations`` seeded orders. ``popularity_prior`` adds ``w x log(1 + count)``.

The cache: ``with scorer.cached():`` keeps each (user, history, candidates, request)'s scores until
the block ends (nested blocks share one), at most ``max_entries`` of them (least recently used out
first). Choosing the fusion weight on the valid split evaluates the same users eleven times inside
one such block, so the LLM scores each user once; outside a block nothing is kept, so a long-lived
``recommend`` or chat process does not grow.
"""

from __future__ import annotations

import torch

from recbole_llmgen import scoring
from recbole_llmgen.prompts import Prompter
from recbole_llmgen.settings import LLMGenSettings

MAX_CACHED_USERS = 200_000  # a valid split of 200k users fits (a few KB each); more: least recently used out


class Scorer:
    """Scores of candidate lists for many users in few forward passes."""

    def __init__(self, llm, prompter: Prompter, settings: LLMGenSettings, item_counts: torch.Tensor):
        self.llm, self.prompts, self.settings, self.item_counts = llm, prompter, settings, item_counts
        self.cache = scoring.ScopedCache(MAX_CACHED_USERS)
        self.scored_users = 0  # users sent through the LLM (cache misses), for reports and tests
        self._shared_prefix: scoring.SharedPrefix | None = None

    # ------------------------------------------------------------------ state
    def weights_changed(self) -> None:
        """The LLM's weights changed (training, a loaded checkpoint): forget what was computed."""
        self._shared_prefix = None
        self.cache.clear()

    def cached(self):
        """Within this block the scores of each (user, history, candidates, request) are computed once."""
        return self.cache.scope()

    @property
    def cache_size(self) -> int:
        return len(self.cache)

    def shared_prefix(self) -> scoring.SharedPrefix:
        """KV cache of the prompt tokens common to every user (computed once per weights)."""
        if self._shared_prefix is None:
            self._shared_prefix = scoring.SharedPrefix(self.llm, self.prompts.common_head())
        return self._shared_prefix

    # ------------------------------------------------------------------ scoring
    def score(
        self,
        histories: list[list[int]],
        candidate_lists: list[list[int]],
        user_keys: list[int] | None = None,
        requests: list[str | None] | None = None,
    ) -> list[torch.Tensor]:
        """The LLM's scores of each user's candidates, one [K_u] per user, higher is better.
        ``requests``: each user's own words, or None (see :meth:`Prompter.build`)."""
        user_keys = user_keys if user_keys is not None else [0] * len(histories)
        requests = requests if requests is not None else [None] * len(histories)
        if not self.cache.active or torch.is_grad_enabled():
            return self._score(histories, candidate_lists, user_keys, requests)
        keys = [(int(u), tuple(h), tuple(c), r) for u, h, c, r in zip(user_keys, histories, candidate_lists, requests)]
        found = {i: self.cache.get(key) for i, key in enumerate(keys) if key in self.cache}  # before any eviction
        todo = [i for i in range(len(keys)) if i not in found]
        if todo:
            fresh = self._score(
                [histories[i] for i in todo],
                [candidate_lists[i] for i in todo],
                [user_keys[i] for i in todo],
                [requests[i] for i in todo],
            )
            for i, scores in zip(todo, fresh):
                found[i] = scores
                self.cache.put(keys[i], scores)
        return [found[i] for i in range(len(keys))]

    def _score(self, histories, candidate_lists, user_keys, requests) -> list[torch.Tensor]:
        self.scored_users += len(histories)
        s, prompts = self.settings, self.prompts
        if s.score_method in ("likelihood", "generate"):  # a beam's score is the likelihood
            mean = s.length_penalty == 1.0
            results = scoring.score_continuations(
                self.llm,
                [prompts.build(h, c, request=r) for h, c, r in zip(histories, candidate_lists, requests)],
                [[prompts.item_token_ids[i] for i in c] for c in candidate_lists],
                shared=self.shared_prefix(),
                batch_tokens=s.llm_score_batch_tokens,
                normalization="mean" if mean else "sum",
                pad_id=prompts.tokenizer.pad_token_id,
            )
            if not mean:  # summed log-prob / tokens ** length_penalty
                results = [
                    sums
                    / torch.tensor([len(prompts.item_token_ids[i]) for i in c], dtype=sums.dtype) ** s.length_penalty
                    for sums, c in zip(results, candidate_lists)
                ]
        else:
            results = self._verbalizer(histories, candidate_lists, user_keys, requests)
        if s.popularity_prior:
            results = [
                scores + s.popularity_prior * torch.log1p(self.item_counts[c].float())
                for scores, c in zip(results, candidate_lists)
            ]
        return results

    def _verbalizer(self, histories, candidate_lists, user_keys, requests) -> list[torch.Tensor]:
        """Each candidate's label log-probability, averaged over seeded shuffles of the list."""
        s, n = self.settings, self.settings.verbalizer_permutations
        prompts, labels, orders = [], [], []
        for history, candidate_ids, user_key, request in zip(histories, candidate_lists, user_keys, requests):
            generator = torch.Generator().manual_seed(s.seed * 1_000_003 + int(user_key))
            for _ in range(n):
                order = torch.randperm(len(candidate_ids), generator=generator).tolist()
                prompts.append(self.prompts.build(history, [candidate_ids[i] for i in order], request=request))
                labels.append(self.prompts.label_token_ids[: len(order)])
                orders.append(order)
        label_scores = scoring.verbalizer_scores_batch(
            self.llm, prompts, labels, self.shared_prefix(), s.llm_score_batch_tokens
        )
        results = []
        for u, candidate_ids in enumerate(candidate_lists):
            scores = torch.zeros(len(candidate_ids))
            for k in range(u * n, (u + 1) * n):
                scores[orders[k]] += label_scores[k]
            results.append(scores / n)
        return results
