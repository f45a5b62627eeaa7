"""Candidate retrieval for full ranking and the merge of LLM scores into a full score row."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch


def item_counts(item_ids: torch.Tensor, n_items: int) -> torch.Tensor:
    """Training interactions per item id. [n_items]"""
    counts = torch.bincount(item_ids.long().cpu(), minlength=n_items)[:n_items]
    counts[0] = 0  # padding id
    return counts


def popularity_scores(counts: torch.Tensor, batch: int) -> torch.Tensor:
    """The same popularity row for every user. [B, n_items]"""
    return counts.float().unsqueeze(0).repeat(batch, 1)


@functools.lru_cache(maxsize=2)
def _encoder(encoder_path: str, device: str):
    """The sentence encoder, loaded once per process and device (a chat session encodes every request)."""
    from sentence_transformers import SentenceTransformer

    from recbole_llmgen.llm import encoder_folder

    return SentenceTransformer(encoder_folder(encoder_path), device=device, local_files_only=True)


def encode_texts(encoder_path: str, texts: Sequence[str], device: str = "cpu") -> torch.Tensor:
    """Unit-norm sentence embeddings of ``texts`` (index 0, padding, gets a zero vector), computed on
    ``device`` and returned on the CPU. [N, d]"""
    encoder = _encoder(encoder_path, str(device))
    embeddings = encoder.encode(
        list(texts), convert_to_tensor=True, normalize_embeddings=True, batch_size=256, show_progress_bar=False
    )
    embeddings = embeddings.float().cpu().clone()  # sentence-transformers returns inference tensors
    embeddings[0] = 0
    return embeddings


def text_scores(item_embeddings: torch.Tensor, histories: Sequence[Sequence[int]]) -> torch.Tensor:
    """Cosine similarity of every item to the mean embedding of each history. [B, n_items]"""
    profiles = torch.stack(
        [item_embeddings[list(h)].mean(dim=0) if len(h) else torch.zeros(item_embeddings.shape[1]) for h in histories]
    )
    profiles = torch.nn.functional.normalize(profiles, dim=-1)
    return profiles @ item_embeddings.T


def mask_seen(scores: torch.Tensor, histories: Sequence[Sequence[int]]) -> torch.Tensor:
    """Padding and the user's history items can never be candidates. [B, n_items]"""
    scores = scores.clone()
    scores[:, 0] = -math.inf
    for b, history in enumerate(histories):
        if len(history):
            scores[b, list(history)] = -math.inf
    return scores


def top_candidates(retrieval: torch.Tensor, k: int) -> torch.Tensor:
    """Item ids of the k best retrieval scores, ties broken by lower item id. [B, k]"""
    order = torch.sort(retrieval, dim=1, descending=True, stable=True).indices
    return order[:, :k]


def merge_scores(retrieval: torch.Tensor, candidate_ids: torch.Tensor, llm_scores: torch.Tensor) -> torch.Tensor:
    """Candidates ranked by ``llm_scores`` above all other items, the rest in retriever order.

    Non-candidates get ``min(candidate score) - 1 - rank / n_items``: strictly below every
    candidate, keeping the retriever's order. Items at -inf (padding, history) stay at -inf.
    ``llm_scores`` entries of -inf mark candidates that were not scored. [B, n_items]
    """
    batch, n_items = retrieval.shape
    order = torch.sort(retrieval, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_items).expand(batch, -1).contiguous())
    scored = torch.where(torch.isfinite(llm_scores), llm_scores, torch.full_like(llm_scores, math.inf))
    floor = scored.min(dim=1).values  # [B]
    floor = torch.where(torch.isfinite(floor), floor, torch.zeros_like(floor))
    merged = floor.unsqueeze(1) - 1.0 - rank.float() / n_items
    merged = torch.where(torch.isfinite(retrieval), merged, retrieval)
    valid = torch.isfinite(llm_scores)
    rows = torch.arange(batch).unsqueeze(1).expand_as(candidate_ids)
    merged[rows[valid], candidate_ids[valid]] = llm_scores[valid].to(merged.dtype)
    return merged


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Each row's finite entries to mean 0, standard deviation 1 (a constant row to 0); -inf stays. [B, K]"""
    valid = torch.isfinite(scores)
    values = torch.where(valid, scores.double(), torch.zeros_like(scores, dtype=torch.float64))
    count = valid.sum(dim=1, keepdim=True).clamp(min=1)
    mean = values.sum(dim=1, keepdim=True) / count
    centred = torch.where(valid, values - mean, torch.zeros_like(values))
    std = (centred.pow(2).sum(dim=1, keepdim=True) / count).sqrt()
    z = torch.where(std > 0, centred / torch.where(std > 0, std, torch.ones_like(std)), torch.zeros_like(centred))
    return torch.where(valid, z, torch.full_like(z, -math.inf))


def fuse(llm_scores: torch.Tensor, candidate_scores: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight`` x standardized LLM score + (1 - weight) x standardized candidate-model score, both
    within each user's candidate list. Weight 0 orders the candidates as the candidate model does,
    1 as the LLM does; entries the LLM did not score (-inf) stay -inf. [B, K]"""
    valid = torch.isfinite(llm_scores)
    llm_z = standardize(llm_scores)
    side_z = standardize(torch.where(valid, candidate_scores.double(), torch.full_like(llm_z, -math.inf)))
    fused = weight * torch.where(valid, llm_z, 0.0) + (1.0 - weight) * torch.where(valid, side_z, 0.0)
    return torch.where(valid, fused, torch.full_like(fused, -math.inf)).float()
