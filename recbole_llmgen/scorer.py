"""The LLM's score of each user's candidate items: prompts from a :class:`~recbole_llmgen.prompts.Prompter`,
packed passes from :mod:`recbole_llmgen.scoring`, and a cache that lives only as long as it is asked for.

``score_method: likelihood`` (and ``generate``, whose beam score is the same number): the summed
log-probability of each candidate's tokens after the prompt / its token count ** ``length_penalty``
(1, the default: the mean). ``verbalizer``: the candidates listed with letters, the next-token
log-probabilities of the letters, averaged over ``verbalizer_permutations`` seeded orders. ``popularity_prior`` adds ``w x log(1 + count)``.

The cache: ``with scorer.cached():`` keeps each (user, history, candidates, request)'s scores until
the block ends (nested blocks share one), at most ``max_entries`` of them (least recently used out
first). Choosing the fusion weight (or ``length_penalty: auto``) on the valid split evaluates the
same users again and again inside one such block (the cache keeps what every value reuses), so the
LLM scores each user once; outside a block nothing is kept, so a long-lived ``recommend`` or chat
process does not grow.
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
        # the length penalty in use (length_penalty: auto: None until the valid split chooses it); the
        # cache keeps summed log-probabilities whenever it is not fixed at 1, so every value reuses them
        self.length_penalty = settings.length_penalty if settings.length_penalty != "auto" else None
        self.summed = settings.score_method in ("likelihood", "generate") and settings.length_penalty != 1.0
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
            return self._finish(self._score(histories, candidate_lists, user_keys, requests), candidate_lists)
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
        return self._finish([found[i] for i in range(len(keys))], candidate_lists)

    def set_length_penalty(self, value: float | None) -> None:
        """The length penalty to rank by from now on (None: none chosen yet). A scorer set up for the
        mean (fixed at 1) switches to keeping summed log-probabilities, which any value divides."""
        if value is not None and value != 1.0 and not self.summed and self.settings.score_method != "verbalizer":
            self.summed = True
            self.cache.clear()  # it held means
        self.length_penalty = value

    def active_length_penalty(self) -> float:
        if self.length_penalty is None:
            raise ValueError(
                "length_penalty: auto chooses its value on the valid split, and no validation has run; train or fit "
                "with valid data (LLMGenTrainer.fit does), load a checkpoint that has it, or set a number in [0, 2]"
            )
        return float(self.length_penalty)

    def _finish(self, results: list[torch.Tensor], candidate_lists) -> list[torch.Tensor]:
        """What the cache keeps (summed log-probabilities, or means when the penalty is fixed at 1) to
        scores: the length penalty in use, then ``popularity_prior``."""
        if self.summed:
            penalty = self.active_length_penalty()
            lengths = self.prompts.item_token_ids
            results = [scoring.length_penalized(sums, [len(lengths[i]) for i in c], penalty)
                       for sums, c in zip(results, candidate_lists)]  # fmt: skip
        if self.settings.popularity_prior:
            prior = self.settings.popularity_prior
            results = [
                scores + prior * torch.log1p(self.item_counts[c].float()) for scores, c in zip(results, candidate_lists)
            ]
        return results

    def _score(self, histories, candidate_lists, user_keys, requests) -> list[torch.Tensor]:
        """Summed log-probabilities of each user's candidates (means when the length penalty is fixed at
        1), or the verbalizer's label scores: what the cache keeps."""
        self.scored_users += len(histories)
        s, prompts = self.settings, self.prompts
        if s.score_method in ("likelihood", "generate"):  # a beam's score is the likelihood
            return scoring.score_continuations(
                self.llm,
                [prompts.build(h, c, request=r) for h, c, r in zip(histories, candidate_lists, requests)],
                [[prompts.item_token_ids[i] for i in c] for c in candidate_lists],
                shared=self.shared_prefix(),
                batch_tokens=s.llm_score_batch_tokens,
                normalization="sum" if self.summed else "mean",
                pad_id=prompts.tokenizer.pad_token_id,
            )
        return self._verbalizer(histories, candidate_lists, user_keys, requests)

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
