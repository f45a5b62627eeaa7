"""Scoring item texts with a causal LM.

``shared_prefix_scores`` runs the user's prompt once, keeps its KV cache, and scores every
candidate continuation against copies of that cache in batches. ``naive_scores`` runs prompt +
candidate from scratch for each candidate: the reference the fast path must match (1e-4).
``verbalizer_scores`` reads the next-token log-probabilities of label tokens in one pass.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _reduce(token_logprobs: torch.Tensor, lengths: torch.Tensor, normalization: str) -> torch.Tensor:
    total = token_logprobs.sum(dim=-1)
    return total / lengths if normalization == "mean" else total


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
        scores.append(_reduce(logprobs[None], torch.tensor([len(cont)], device=device), normalization)[0])
    return torch.stack(scores).cpu()


@torch.no_grad()
def encode_prefix(model, prompt_ids: Sequence[int]):
    """Run the prompt once: returns (KV cache [1, ...], log-probs of the next token [V])."""
    ids = torch.tensor([list(prompt_ids)], device=model.device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out.cache, F.log_softmax(out.logits[0, -1].float(), dim=-1)


@torch.no_grad()
def shared_prefix_scores(
    model,
    prompt_ids: Sequence[int],
    continuations: Sequence[Sequence[int]],
    batch_size: int = 64,
    normalization: str = "mean",
) -> torch.Tensor:
    """Log-probability of each continuation after the prompt, sharing the prompt's KV cache. [K]

    The prompt runs once. Each batch of continuations (right-padded: a causal model never looks
    at later positions, so padding changes no real position) runs on a copy of the prompt's cache
    repeated along the batch. The first token's log-prob comes from the prompt's last logits.
    """
    if any(len(c) == 0 for c in continuations):
        raise ValueError("shared_prefix_scores: every continuation needs at least one token")
    device = model.device
    cache, first_logprobs = encode_prefix(model, prompt_ids)
    scores = torch.empty(len(continuations))
    for start in range(0, len(continuations), batch_size):
        chunk = continuations[start : start + batch_size]
        k, longest = len(chunk), max(len(c) for c in chunk)
        targets = torch.zeros(k, longest, dtype=torch.long)
        mask = torch.zeros(k, longest)
        for row, cont in enumerate(chunk):
            targets[row, : len(cont)] = torch.tensor(cont)
            mask[row, : len(cont)] = 1
        targets, mask = targets.to(device), mask.to(device)
        token_logprobs = torch.zeros(k, longest, device=device)
        token_logprobs[:, 0] = first_logprobs[targets[:, 0]]
        if longest > 1:
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(k)
            logits = model(input_ids=targets[:, :-1], cache=batch_cache, use_cache=True).logits
            logprobs = F.log_softmax(logits.float(), dim=-1)  # [k, longest-1, V]
            token_logprobs[:, 1:] = logprobs.gather(2, targets[:, 1:, None])[..., 0]
        token_logprobs = token_logprobs * mask
        scores[start : start + k] = _reduce(token_logprobs, mask.sum(dim=1), normalization).cpu()
    return scores


@torch.no_grad()
def verbalizer_scores(model, prompt_ids: Sequence[int], label_token_ids: Sequence[int]) -> torch.Tensor:
    """Log-probabilities of the label tokens as the next token, normalised over the labels. [K]"""
    ids = torch.tensor([list(prompt_ids)], device=model.device)
    logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
    return F.log_softmax(logits[list(label_token_ids)], dim=-1).cpu()
