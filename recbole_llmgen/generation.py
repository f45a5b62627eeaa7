"""Direct generation of catalogue items: a prefix tree of item token ids and a beam search that
can only walk it, so every finished beam is exactly one catalogue text.

Item scores are the mean log-probability of the item's tokens after the prompt, the number
``scoring.shared_prefix_scores`` gives the same item (beams are ranked while searching by their
summed log-probability, as usual; finished items by the length-normalised one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class ItemTrie:
    """Prefix tree over item token sequences.

    Node 0 is the root. ``children[node]`` maps a token id to the next node; ``items[node]`` lists
    the item ids whose text ends exactly there (the explicit end marker: a text that is a prefix of
    another text stays reachable). Several items with the same text share one node, ids sorted.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], item_ids: Sequence[int]):
        self.children: list[dict[int, int]] = [{}]
        self.items: list[list[int]] = [[]]
        for tokens, item in zip(sequences, item_ids):
            if not tokens:
                raise ValueError(f"item {item} has no tokens: it could never be generated")
            node = 0
            for token in tokens:
                nxt = self.children[node].get(token)
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][token] = nxt
                    self.children.append({})
                    self.items.append([])
                node = nxt
            self.items[node].append(int(item))
        for ids in self.items:
            ids.sort()

    def __len__(self) -> int:
        return len(self.children)

    def walk(self, tokens: Sequence[int]) -> int | None:
        node = 0
        for token in tokens:
            node = self.children[node].get(token)
            if node is None:
                return None
        return node

    def items_of(self, tokens: Sequence[int]) -> list[int]:
        node = self.walk(tokens)
        return [] if node is None else list(self.items[node])


def constrained_beam_search(
    model, prompt_ids: Sequence[int], trie: ItemTrie, num_beams: int
) -> list[tuple[int, float]]:
    """Items reachable by a beam search over ``trie`` after one prompt, best first.

    Returns ``(item_id, mean token log-prob)`` for every item whose end a beam reached, sorted by
    score (ties by item id). With ``num_beams`` >= the number of items every item is reached, so the
    result is the exact ranking of the whole catalogue. One user of
    :func:`batched_constrained_beam_search` (no padding).
    """
    return batched_constrained_beam_search(model, [prompt_ids], trie, num_beams)[0]


def _allowed_logprobs(logits: torch.Tensor, beams, trie: ItemTrie) -> list[float]:
    """Each beam's log-probabilities of the tokens its trie node allows, in the order of
    ``trie.children[node]``, beam after beam. Normalised over the whole vocabulary on the model's
    device; only the allowed entries are copied to the host (never a [rows, vocabulary] tensor)."""
    rows, tokens = [], []
    for row, (_, node, _, _) in enumerate(beams):
        children = trie.children[node]
        rows.extend([row] * len(children))
        tokens.extend(children)
    logprobs = F.log_softmax(logits.float(), dim=-1)  # [rows, V]
    index = torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device)
    return logprobs[index].tolist()


@torch.no_grad()
def batched_constrained_beam_search(
    model, prompts: Sequence[Sequence[int]], trie: ItemTrie, num_beams: int, pad_token_id: int = 0
) -> list[list[tuple[int, float]]]:
    """Catalogue-constrained beam search for several users at once, best items first per user.

    Each prompt runs once; its KV cache rows are reordered by parent beam at every step. Beams
    are ranked by summed log-prob, finished items by mean log-prob. Prompts are left-padded into one batch (2-D attention mask, explicit position ids); every step
    feeds the live beams of all users together, each row attending to its own user's prompt only.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams: expected an integer >= 1, got {num_beams}")
    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.cache
    logits = out.logits[:, -1]  # [rows, V], on the model's device
    # one row per live beam: (user, trie node, summed log-prob, length)
    beams = [(user, 0, 0.0, 0) for user in range(len(prompts))]
    finished: list[dict[int, float]] = [{} for _ in prompts]
    step = 0
    while beams:
        values = iter(_allowed_logprobs(logits, beams, trie))
        per_user: dict[int, list] = {}
        for row, (user, node, total, length) in enumerate(beams):
            for token, child in trie.children[node].items():
                per_user.setdefault(user, []).append((total + next(values), row, token, child, length + 1))
        live = []
        for user in sorted(per_user):
            expansions = sorted(per_user[user], key=lambda e: (-e[0], e[1], e[2]))[:num_beams]
            for total, row, token, child, length in expansions:
                for item in trie.items[child]:
                    finished[user][item] = total / length
                if trie.children[child]:
                    live.append((user, child, total, length, row, token))
        if not live:
            break
        step += 1
        cache.batch_select_indices(torch.tensor([row for *_, row, _ in live], device=device))
        users = [user for user, *_ in live]
        step_mask = torch.cat([mask[users], torch.ones(len(live), step, dtype=torch.long)], dim=1)
        step_positions = torch.tensor([[len(prompts[u]) + step - 1] for u in users])
        logits = model(
            input_ids=torch.tensor([[token] for *_, token in live], device=device),
            attention_mask=step_mask.to(device),
            position_ids=step_positions.to(device),
            cache=cache,
            use_cache=True,
        ).logits[:, -1]
        beams = [(user, child, total, length) for user, child, total, length, _, _ in live]
    return [sorted(f.items(), key=lambda kv: (-kv[1], kv[0])) for f in finished]


class Generator:
    """``score_method: generate``: the catalogue items an LLM writes for each user.

    ``generation_constraint: trie``: constrained beam search over :class:`ItemTrie` (every beam a
    catalogue text); ``none``: free beam-search generations, each item then scored by its best
    sentence-embedding similarity to one of them (BIGRec-style grounding; ``stats`` counts how many
    generations were exact catalogue texts in the last call).
    """

    def __init__(self, llm, prompter, settings, retriever):
        self.llm, self.prompts, self.settings, self.retriever = llm, prompter, settings, retriever
        self._trie: ItemTrie | None = None
        self.stats = {"generations": 0, "exact": 0}

    def trie(self) -> ItemTrie:
        """Prefix tree of every item's tokens (the same tokens the likelihood scorer uses)."""
        if self._trie is None:
            items = list(range(1, len(self.prompts.item_token_ids)))
            self._trie = ItemTrie([self.prompts.item_token_ids[i] for i in items], items)
        return self._trie

    def items(
        self, histories: list[list[int]], requests: list[str | None] | None = None
    ) -> list[list[tuple[int, float]]]:
        """Catalogue items reached by constrained beam search, best first, per user: (item id, score);
        ``generation_users_per_batch`` users per forward pass. History items are left out."""
        s = self.settings
        requests = requests or [None] * len(histories)
        longest = self.prompts.longest_item
        prompts = [self.prompts.build(h, reserve_tokens=longest, request=r) for h, r in zip(histories, requests)]
        found = []
        for start in range(0, len(prompts), s.generation_users_per_batch):
            found.extend(
                batched_constrained_beam_search(
                    self.llm,
                    prompts[start : start + s.generation_users_per_batch],
                    self.trie(),
                    s.num_beams,
                    self.prompts.tokenizer.pad_token_id,
                )
            )
        results = []
        for history, pairs in zip(histories, found):
            seen = {i for i in history if i}
            pairs = [(item, score) for item, score in pairs if item not in seen]
            if s.popularity_prior:
                prior = s.popularity_prior * torch.log1p(self.retriever.item_counts.float())
                pairs = sorted(((i, v + float(prior[i])) for i, v in pairs), key=lambda kv: (-kv[1], kv[0]))
            results.append(pairs)
        return results

    @torch.no_grad()
    def free_text(self, history: list[int]) -> list[str]:
        """``num_beams`` unconstrained generations (beam search), best first."""
        s, tokenizer = self.settings, self.prompts.tokenizer
        prompt = self.prompts.build(history, reserve_tokens=s.max_item_text_tokens)
        ids = torch.tensor([prompt], device=self.llm.device)
        newline = tokenizer.encode("\n", add_special_tokens=False)
        output = self.llm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=s.max_item_text_tokens,
            num_beams=s.num_beams,
            num_return_sequences=s.num_beams,
            do_sample=False,
            eos_token_id=[tokenizer.eos_token_id, *newline[-1:]],
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    def ground(self, generations: list[str]) -> torch.Tensor:
        """Catalogue scores of free generations: the best cosine similarity to any of them, the
        earlier (better) generation winning ties. Counts exact catalogue texts. [n_items]"""
        exact = set(self.prompts.item_texts[1:])
        self.stats["generations"] += len(generations)
        self.stats["exact"] += sum(1 for g in generations if g in exact)
        embeddings = self.retriever.encode(["", *generations])[1:]  # [G, d]
        similarity = embeddings @ self.retriever.item_embeddings().T  # [G, n_items]
        rank_penalty = 1e-4 * torch.arange(len(generations), dtype=similarity.dtype).unsqueeze(1)
        return (similarity - rank_penalty).max(dim=0).values

    def grounded(self, histories: list[list[int]]) -> torch.Tensor:
        """``generation_constraint: none``: each user's grounded catalogue scores; ``stats`` counts
        this call's generations only. [B, n_items]"""
        self.stats = {"generations": 0, "exact": 0}
        return torch.stack([self.ground(self.free_text(h)) for h in histories])
