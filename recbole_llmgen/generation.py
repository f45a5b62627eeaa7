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
    next_logprobs = F.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()  # [rows, V]
    # one row per live beam: (user, trie node, summed log-prob, length)
    beams = [(user, 0, 0.0, 0) for user in range(len(prompts))]
    finished: list[dict[int, float]] = [{} for _ in prompts]
    step = 0
    while beams:
        per_user: dict[int, list] = {}
        for row, (user, node, total, length) in enumerate(beams):
            tokens = list(trie.children[node])
            values = next_logprobs[row, tokens].tolist() if tokens else []
            for token, value in zip(tokens, values):
                per_user.setdefault(user, []).append(
                    (total + value, row, token, trie.children[node][token], length + 1)
                )
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
        next_logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
        beams = [(user, child, total, length) for user, child, total, length, _, _ in live]
    return [sorted(f.items(), key=lambda kv: (-kv[1], kv[0])) for f in finished]
