"""Direct generation of catalogue items: a prefix tree of item token ids and a beam search that
can only walk it, so every finished beam is exactly one catalogue text.

Item scores are the summed log-probability of the item's tokens after the prompt / its token count
** ``length_penalty`` (1: the mean), the number likelihood scoring gives the same item (beams are
ranked while searching by their summed log-probability, as usual; finished items by that score).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from recbole_llmgen.scoring import PackedRow, ScopedCache, SharedPrefix, length_penalized, pass_tensors


class ItemTrie:
    """Prefix tree over item token sequences.

    Node 0 is the root. ``children[node]`` maps a token id to the next node; ``items[node]`` lists
    the item ids whose text ends exactly there (the explicit end marker: a text that is a prefix of
    another text stays reachable). Several items with the same text share one node, ids sorted.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], item_ids: Sequence[int]):
        self.children: list[dict[int, int]] = [{}]
        self.items: list[list[int]] = [[]]
        self.parent: list[int] = [-1]
        paths: dict[int, list[int]] = {}  # item -> the nodes of its text, root excluded
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
                    self.parent.append(node)
                node = nxt
                paths.setdefault(int(item), []).append(node)
            self.items[node].append(int(item))
        for ids in self.items:
            ids.sort()
        self.paths = {item: np.asarray(nodes, dtype=np.int64) for item, nodes in paths.items()}
        # items whose text ends at or below each node (a node is exhausted when a user has seen them all)
        self.below = np.bincount(np.concatenate([*self.paths.values(), np.zeros(0, np.int64)]), minlength=len(self))

    def exhausted(self, seen: Iterable[int]) -> set[int]:
        """Nodes every item at or below which is in ``seen``: a beam entering one could only
        finish seen items."""
        paths = [self.paths[i] for i in set(seen) if i in self.paths]
        if not paths:
            return set()
        counts = np.bincount(np.concatenate(paths), minlength=len(self))
        return set(np.flatnonzero((counts == self.below) & (self.below > 0)).tolist())

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
    model, prompt_ids: Sequence[int], trie: ItemTrie, num_beams: int, seen: Iterable[int] = ()
) -> list[tuple[int, float]]:
    """Items reachable by a beam search over ``trie`` after one prompt, best first.

    Returns ``(item_id, mean token log-prob)`` for every item whose end a beam reached, sorted by
    score (ties by item id). With ``num_beams`` >= the number of items every item is reached, so the
    result is the exact ranking of the whole catalogue. One user of :func:`batched_constrained_beam_search`.
    """
    return batched_constrained_beam_search(model, [prompt_ids], trie, num_beams, seen=[seen])[0]


@torch.no_grad()
def batched_constrained_beam_search(
    model,
    prompts: Sequence[Sequence[int]],
    trie: ItemTrie,
    num_beams: int,
    pad_token_id: int = 0,
    seen: Sequence[Iterable[int]] | None = None,
    shared: SharedPrefix | None = None,
    counts: dict | None = None,
    length_penalty: float = 1.0,
) -> list[list[tuple[int, float]]]:
    """Catalogue-constrained beam search for several users at once, best items first per user.

    ``seen[u]``: items user u may not be recommended. A trie node whose every item is seen is never
    entered and a seen item is never finished, so no beam is spent on them. Beams are ranked by
    summed log-probability, finished items by the sum / tokens ** ``length_penalty`` (1: the mean;
    the number likelihood scoring gives with the same setting).

    One row per user, append-only: the prompt runs once (after ``shared``, a prefix every prompt
    starts with, computed once), then each step feeds the new token of every live beam of every
    user as a node of that user's row; a 4-D attention mask lets a node see its user's prompt and
    its own ancestors only (beams of a user share their common prefix, as the trie does). No KV
    cache is copied per beam, and only the allowed tokens' log-probabilities leave the device.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams: expected an integer >= 1, got {num_beams}")
    device, dtype = model.device, model.dtype
    seen_sets = [set(s) for s in seen] if seen is not None else [set() for _ in prompts]
    dead = [trie.exhausted(s) for s in seen_sets]
    offset = len(shared.ids) if shared is not None and all(shared.matches(p) for p in prompts) else 0
    rows = [PackedRow(list(p[offset:]), offset) for p in prompts]
    ids, positions, mask, keep = pass_tensors(rows, offset, pad_token_id, dtype)
    cache = shared.batch_cache(len(rows)) if offset else None
    out = model(
        input_ids=ids.to(device),
        position_ids=positions.to(device),
        attention_mask=mask.to(device),
        cache=cache,
        use_cache=True,
        logits_to_keep=keep.to(device),
    )
    cache, logits = out.cache, out.logits  # logits [users, V]: each prompt's last position
    counts = counts if counts is not None else {}
    counts["prompt_tokens"] = counts.get("prompt_tokens", 0) + sum(len(r.prompt) for r in rows)
    width = offset + ids.shape[1]  # columns in the cache
    prompt_columns = [offset + len(r.prompt) for r in rows]  # user u sees columns [0, this)
    next_position = [offset + len(r.prompt) for r in rows]  # position of a depth-1 token
    node_columns: list[dict[int, list[int]]] = [{0: []} for _ in prompts]  # trie node -> its path's columns
    # one entry per live beam: (user, trie node, summed log-prob, length); its log-probs are row `k` of logits
    beams = [(user, 0, 0.0, 0) for user in range(len(prompts))]
    finished: list[dict[int, tuple[float, int]]] = [{} for _ in prompts]  # item -> (summed log-prob, tokens)
    while beams:
        values = iter(_allowed_logprobs(logits, beams, trie))
        per_user: dict[int, list] = {}
        for row, (user, node, total, length) in enumerate(beams):
            for token, child in trie.children[node].items():
                value = next(values)
                if child not in dead[user]:
                    per_user.setdefault(user, []).append((total + value, row, token, child, length + 1))
        live = []
        for user in sorted(per_user):
            for total, _, token, child, length in sorted(per_user[user], key=lambda e: (-e[0], e[1], e[2]))[:num_beams]:
                for item in trie.items[child]:
                    if item not in seen_sets[user]:
                        finished[user][item] = (total, length)
                if trie.children[child]:
                    live.append((user, child, total, length, token))
        if not live:
            break
        counts["beam_tokens"] = counts.get("beam_tokens", 0) + len(live)
        counts["steps"] = counts.get("steps", 0) + 1
        logits, width = _feed(
            model, cache, live, trie, node_columns, prompt_columns, next_position, width, pad_token_id
        )
        beams = [(user, child, total, length) for user, child, total, length, _ in live]
    return [ranked(list(f), [f[i][0] for i in f], [f[i][1] for i in f], length_penalty) for f in finished]


def ranked(
    items: list[int], sums: list[float], lengths: list[int], length_penalty: float, prior: torch.Tensor | None = None
) -> list[tuple[int, float]]:
    """(item, summed log-prob / tokens ** length_penalty [+ prior[item]]), best first (ties: the smaller id)."""
    if not items:
        return []
    scores = length_penalized(torch.tensor(sums, dtype=torch.float64), lengths, length_penalty)
    if prior is not None:
        scores = scores + prior[items].double()
    return sorted(zip(items, scores.tolist()), key=lambda kv: (-kv[1], kv[0]))


def _feed(model, cache, live, trie, node_columns, prompt_columns, next_position, width, pad_id):
    """One step: every live beam's new token as a node of its user's row. Returns the nodes'
    logits [len(live), V] (in ``live`` order) and the cache's new width."""
    users = len(node_columns)
    per_row: list[list[int]] = [[] for _ in range(users)]
    for k, (user, *_rest) in enumerate(live):
        per_row[user].append(k)
    step = max(len(r) for r in per_row)
    ids = torch.full((users, step), pad_id, dtype=torch.long)
    positions = torch.zeros((users, step), dtype=torch.long)
    allowed = torch.zeros((users, step, width + step), dtype=torch.bool)
    keep = torch.zeros((users, step), dtype=torch.bool)
    diagonal = torch.arange(step)
    allowed[:, diagonal, width + diagonal] = True  # every position sees itself (padding only itself)
    for user, entries in enumerate(per_row):
        for j, k in enumerate(entries):
            _, child, _, length, token = live[k]
            parent = trie.parent[child]
            path = node_columns[user][parent] + [width + j]
            node_columns[user][child] = path
            ids[user, j] = token
            positions[user, j] = next_position[user] + length - 1
            allowed[user, j, : prompt_columns[user]] = True
            allowed[user, j, path] = True
            keep[user, j] = True
    mask = torch.zeros(allowed.shape, dtype=model.dtype).masked_fill_(~allowed, torch.finfo(model.dtype).min)
    device = model.device
    logits = model(
        input_ids=ids.to(device),
        position_ids=positions.to(device),
        attention_mask=mask[:, None].to(device),
        cache=cache,
        use_cache=True,
        logits_to_keep=keep.to(device),
    ).logits  # [kept, V], row by row: user 0's nodes, then user 1's...
    order = [k for entries in per_row for k in entries]
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))
    return logits[back.to(device)], width + step


def _allowed_logprobs(logits: torch.Tensor, beams, trie: ItemTrie) -> list[float]:
    """Each beam's log-probabilities of the tokens its trie node allows, in the order of
    ``trie.children[node]``, beam after beam. Normalised over the whole vocabulary on the model's
    device; only the allowed entries are copied to the host (never a [rows, vocabulary] tensor)."""
    rows, tokens = [], []
    for row, (_, node, _, _) in enumerate(beams):
        children = trie.children[node]
        rows.extend([row] * len(children))
        tokens.extend(children)
    index = torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device)
    picked = logits[index].float()
    return (picked - torch.logsumexp(logits.float(), dim=-1)[index[0]]).tolist()


class Generator:
    """``score_method: generate``: the catalogue items an LLM writes for each user.

    ``generation_constraint: trie``: constrained beam search over :class:`ItemTrie` (every beam a
    catalogue text); ``none``: free beam-search generations, each item then scored by its best
    sentence-embedding similarity to one of them (BIGRec-style grounding; ``stats`` counts how many
    generations were exact catalogue texts in the last call).
    """

    def __init__(self, llm, prompter, settings, retriever, shared_prefix=None, length_penalty=None):
        self.llm, self.prompts, self.settings, self.retriever = llm, prompter, settings, retriever
        self.shared_prefix = shared_prefix  # () -> SharedPrefix of the prompts' common head (the scorer's)
        # () -> the length penalty in use (the scorer's active_length_penalty); default: the settings' number
        self.length_penalty = length_penalty or (lambda: float(settings.length_penalty))
        self.searched_users = 0  # users sent through beam search (cache misses), for reports and tests
        self.counts: dict = {}  # tokens computed by the searches: prompt_tokens, beam_tokens, steps
        self.stats = {"generations": 0, "exact": 0}
        self._trie: ItemTrie | None = None
        self.cache = ScopedCache()

    def cached(self):
        """Within this block each (history, request, seen items)'s generation runs once (the
        fusion grid evaluates the same users eleven times); nothing is kept after it."""
        return self.cache.scope()

    def weights_changed(self) -> None:
        """The LLM's weights changed: generations computed before are void."""
        self.cache.clear()

    def trie(self) -> ItemTrie:
        """Prefix tree of every item's tokens (the same tokens the likelihood scorer uses)."""
        if self._trie is None:
            items = list(range(1, len(self.prompts.item_token_ids)))
            self._trie = ItemTrie([self.prompts.item_token_ids[i] for i in items], items)
        return self._trie

    def items(
        self,
        histories: list[list[int]],
        requests: list[str | None] | None = None,
        seen: list[list[int]] | None = None,
    ) -> list[list[tuple[int, float]]]:
        """Catalogue items reached by constrained beam search, best first, per user: (item id, score);
        ``generation_users_per_batch`` users per forward pass. ``seen[u]`` (default: the history) is
        never generated: no beam is spent on it."""
        requests = requests or [None] * len(histories)
        seen = seen if seen is not None else histories
        if not self.cache.active:
            return self._finish(self._search(histories, requests, seen))
        keys = [(tuple(h), r, tuple(sorted(set(x)))) for h, r, x in zip(histories, requests, seen)]
        found = {i: self.cache.get(key) for i, key in enumerate(keys) if key in self.cache}
        todo = [i for i in range(len(keys)) if i not in found]
        if todo:
            fresh = self._search([histories[i] for i in todo], [requests[i] for i in todo], [seen[i] for i in todo])
            for i, pairs in zip(todo, fresh):
                found[i] = pairs
                self.cache.put(keys[i], pairs)
        return self._finish([found[i] for i in range(len(keys))])

    def _finish(self, found: list[list[tuple[int, float]]]) -> list[list[tuple[int, float]]]:
        """Searches' (item, summed log-prob) to scores, best first: the length penalty in use (the
        scorer's: ``length_penalty: auto`` sets it on the valid split), then ``popularity_prior``."""
        s, lengths, penalty = self.settings, self.prompts.item_token_ids, self.length_penalty()
        prior = s.popularity_prior * torch.log1p(self.retriever.item_counts.float()) if s.popularity_prior else None
        return [
            ranked([i for i, _ in pairs], [v for _, v in pairs], [len(lengths[i]) for i, _ in pairs], penalty, prior)
            for pairs in found
        ]

    def _search(self, histories, requests, seen) -> list[list[tuple[int, float]]]:
        """Per user, the items the beams reached with their summed log-probabilities (what the cache keeps)."""
        s = self.settings
        self.searched_users += len(histories)
        longest = self.prompts.longest_item
        prompts = [self.prompts.build(h, reserve_tokens=longest, request=r) for h, r in zip(histories, requests)]
        shared = self.shared_prefix() if self.shared_prefix is not None else None
        found = []
        for start in range(0, len(prompts), s.generation_users_per_batch):
            end = start + s.generation_users_per_batch
            found.extend(
                batched_constrained_beam_search(
                    self.llm, prompts[start:end], self.trie(), s.num_beams, self.prompts.tokenizer.pad_token_id,
                    seen=seen[start:end], shared=shared, counts=self.counts, length_penalty=0.0,
                )
            )  # fmt: skip
        return found

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
