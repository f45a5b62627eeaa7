"""Scoring item texts with a causal LM.

``shared_prefix_scores`` runs the user's prompt once, keeps its KV cache, and scores all candidate
continuations in one packed pass over that cache. ``naive_scores`` runs prompt +
candidate from scratch for each candidate: the reference the fast path must match (1e-4).
``verbalizer_scores`` reads the next-token log-probabilities of label tokens in one pass.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def naive_scores(
    model, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]], normalization: str = "mean"
) -> torch.Tensor:
    """Log-probability of each continuation after the prompt, one full forward pass each. [K]"""
    device = model.device
    scores = []
    for cont in continuations:
        ids = torch.tensor([list(prompt_ids) + list(cont)], device=device)
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()  # [L, V]
        logprobs = F.log_softmax(logits, dim=-1).gather(1, torch.tensor(cont, device=device)[:, None])[:, 0]
        scores.append(logprobs.mean() if normalization == "mean" else logprobs.sum())
    return torch.stack(scores).cpu()


class SharedPrefix:
    """The KV cache of the tokens every prompt starts with (system message, instructions).

    Computed once; a prompt that starts with exactly these token ids continues from a copy of
    it instead of recomputing them. Same ids at the same positions: the same computation.
    """

    def __init__(self, model, ids: Sequence[int]):
        self.ids = list(ids)
        with torch.no_grad():
            self.cache = model(input_ids=torch.tensor([self.ids], device=model.device), use_cache=True).cache

    def split(self, prompt_ids: Sequence[int]):
        """(cache copy, remaining ids) when the prompt extends this prefix, else (None, prompt)."""
        n = len(self.ids)
        if len(prompt_ids) > n and list(prompt_ids[:n]) == self.ids:
            return copy.deepcopy(self.cache), list(prompt_ids[n:])
        return None, list(prompt_ids)


@torch.no_grad()
def encode_prefix(model, prompt_ids: Sequence[int], shared: SharedPrefix | None = None):
    """Run the prompt once: returns (KV cache [1, ...], log-probs of the next token [V])."""
    cache, rest = shared.split(prompt_ids) if shared is not None else (None, list(prompt_ids))
    ids = torch.tensor([rest], device=model.device)
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.cache, F.log_softmax(out.logits[0, -1].float(), dim=-1)


def pack_continuations(continuations: Sequence[Sequence[int]], prefix_length: int, dtype: torch.dtype):
    """Lay candidates side by side after one prefix.

    Returns ``input_ids`` [1, T] (each candidate without its last token), ``position_ids`` [1, T]
    (every candidate restarts at ``prefix_length``), an additive attention mask
    [1, 1, T, prefix_length + T] (each token sees the whole prefix and the earlier tokens of its
    own candidate only), and ``segments``: the packed slice of each candidate.
    """
    inputs, positions, segments, start = [], [], [], 0
    for cont in continuations:
        body = list(cont[:-1])
        inputs.extend(body)
        positions.extend(range(prefix_length, prefix_length + len(body)))
        segments.append((start, start + len(body)))
        start += len(body)
    total = start
    allowed = torch.zeros(total, prefix_length + total, dtype=torch.bool)
    allowed[:, :prefix_length] = True
    for begin, end in segments:
        allowed[begin:end, prefix_length + begin : prefix_length + end] = (
            torch.ones(end - begin, end - begin).tril().bool()
        )
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return torch.tensor([inputs]), torch.tensor([positions]), mask[None, None], segments


@torch.no_grad()
def shared_prefix_scores(
    model,
    prompt_ids: Sequence[int],
    continuations: Sequence[Sequence[int]],
    batch_size: int = 64,
    normalization: str = "mean",
    shared: SharedPrefix | None = None,
) -> torch.Tensor:
    """Log-probability of each continuation after the prompt, sharing the prompt's KV cache. [K]

    The prompt runs once and its KV cache is kept. Candidates are packed into one sequence that
    attends to that cache (see :func:`pack_continuations`): the prompt's keys and values are
    neither recomputed nor copied per candidate. The first token of every candidate is scored
    from the prompt's last logits; ``batch_size`` candidates go in each packed pass. ``shared``:
    a prefix common to all prompts, computed once for all users.
    """
    if any(len(c) == 0 for c in continuations):
        raise ValueError("shared_prefix_scores: every continuation needs at least one token")
    device = model.device
    cache, first_logprobs = encode_prefix(model, prompt_ids, shared)
    scores = torch.empty(len(continuations))
    for start in range(0, len(continuations), batch_size):
        chunk = continuations[start : start + batch_size]
        token_logprobs = [[first_logprobs[c[0]]] for c in chunk]
        if max(len(c) for c in chunk) > 1:
            ids, positions, mask, segments = pack_continuations(chunk, len(prompt_ids), model.dtype)
            logits = model(
                input_ids=ids.to(device),
                position_ids=positions.to(device),
                attention_mask=mask.to(device),
                cache=copy.deepcopy(cache),
                use_cache=True,
            ).logits[0]
            logprobs = F.log_softmax(logits.float(), dim=-1)  # [T, V]
            for row, (cont, (begin, end)) in enumerate(zip(chunk, segments)):
                targets = torch.tensor(cont[1:], device=device)
                token_logprobs[row].extend(logprobs[begin:end].gather(1, targets[:, None])[:, 0])
        for row, values in enumerate(token_logprobs):
            values = torch.stack(values)
            scores[start + row] = (values.mean() if normalization == "mean" else values.sum()).item()
    return scores


@torch.no_grad()
def verbalizer_scores(
    model, prompt_ids: Sequence[int], label_token_ids: Sequence[int], shared: SharedPrefix | None = None
) -> torch.Tensor:
    """Log-probabilities of the label tokens as the next token, normalised over the labels. [K]"""
    _, next_logprobs = encode_prefix(model, prompt_ids, shared)
    return F.log_softmax(next_logprobs[list(label_token_ids)], dim=-1).cpu()
