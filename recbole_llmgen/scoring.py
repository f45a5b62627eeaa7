"""Scoring item texts with a causal LM.

:func:`score_continuations` scores the candidates of many users in few forward passes. Each user
becomes one packed row: the prompt, then the candidates' tokens laid out as a prefix tree (tokens
that several candidates start with are computed once), every candidate token attending to the
whole prompt and to its own earlier tokens only (a 4-D attention mask, explicit position ids).
Rows of similar length share a pass (``batch_tokens`` bounds its padded size). Log-probabilities
are taken only at the positions whose next token is scored, in fp32. A prompt head common to all
users (:class:`SharedPrefix`) is computed once. ``naive_scores`` runs prompt + candidate from
scratch for each candidate: the reference the fast path must match (1e-4 in fp32).
:func:`verbalizer_scores_batch` reads the next-token log-probabilities of label tokens.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_BATCH_TOKENS = 2048  # padded tokens per scoring pass (see properties/LLMGen.yaml)


class ScopedCache:
    """Results kept only inside ``with cache.scope():`` (nested blocks share one store, emptied
    when the outermost ends), at most ``max_entries`` of them, least recently used out first.
    Outside a block nothing is kept: a long-lived process does not grow."""

    def __init__(self, max_entries: int | None = None):
        self.max_entries = max_entries
        self._store: OrderedDict | None = None
        self._depth = 0

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        if self._depth == 0:
            self._store = OrderedDict()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._store = None

    @property
    def active(self) -> bool:
        return self._store is not None

    def __len__(self) -> int:
        return 0 if self._store is None else len(self._store)

    def __contains__(self, key) -> bool:
        return self._store is not None and key in self._store

    def get(self, key):
        self._store.move_to_end(key)
        return self._store[key]

    def put(self, key, value) -> None:
        self._store[key] = value
        while self.max_entries is not None and len(self._store) > self.max_entries:
            self._store.popitem(last=False)

    def clear(self) -> None:
        if self._store is not None:
            self._store.clear()


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

    Computed once; a prompt that starts with exactly these token ids continues from it instead
    of recomputing them. Same ids at the same positions: the same computation.
    """

    def __init__(self, model, ids: Sequence[int]):
        self.ids = list(ids)
        with torch.no_grad():
            self.cache = model(input_ids=torch.tensor([self.ids], device=model.device), use_cache=True).cache

    def matches(self, prompt_ids: Sequence[int]) -> bool:
        n = len(self.ids)
        return len(prompt_ids) > n and list(prompt_ids[:n]) == self.ids

    def batch_cache(self, rows: int):
        """A copy of the cache repeated for ``rows`` rows (a forward pass appends to it)."""
        cache = copy.deepcopy(self.cache)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return cache


@dataclass
class PackedRow:
    """One row of a scoring pass: prompt tokens (after any shared prefix), then tree nodes.

    ``parents[k]`` is the node before node k (-1: the prompt's last token); ``reads`` lists, per
    continuation, ``(node, token)`` pairs: the log-probability of ``token`` is read at the output
    of ``node`` (-1: the prompt's last token).
    """

    prompt: list[int]  # the prompt ids after the shared prefix
    offset: int  # position id of prompt[0] (length of the shared prefix)
    nodes: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    reads: list[list[tuple[int, int]]] = field(default_factory=list)
    owner: tuple[int, list[int]] = (0, [])  # (user index, indices of its continuations in this row)

    def __len__(self) -> int:
        return len(self.prompt) + len(self.nodes)


def prefix_tree_row(prompt: list[int], offset: int, continuations: Sequence[Sequence[int]]) -> PackedRow:
    """Pack ``continuations`` after ``prompt`` as a prefix tree: each distinct leading token
    sequence is one node, so candidates that start alike share their first tokens' work.
    Every token but a continuation's last is an input (the last is only read)."""
    row = PackedRow(prompt, offset)
    index: dict[tuple[int, ...], int] = {}
    for cont in continuations:
        cont = list(cont)
        reads = [(-1, cont[0])]
        parent = -1
        for j in range(1, len(cont)):
            key = tuple(cont[:j])
            node = index.get(key)
            if node is None:
                node = index[key] = len(row.nodes)
                row.nodes.append(cont[j - 1])
                row.parents.append(parent)
                row.depths.append(j - 1)
            reads.append((node, cont[j]))
            parent = node
        row.reads.append(reads)
    return row


def pass_tensors(rows: Sequence[PackedRow], shared_length: int, pad_id: int, dtype: torch.dtype):
    """Inputs of one forward pass over ``rows`` (right-padded to the longest).

    Returns ``input_ids`` [B, T], ``position_ids`` [B, T], an additive attention mask
    [B, 1, T, S + T] (S: shared prefix length) and ``keep`` [B, T], the positions whose logits
    are read (the prompt's last token and every tree node).
    """
    width = max(len(r) for r in rows)
    s = shared_length
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    allowed = np.zeros((len(rows), width, s + width), dtype=bool)
    keep = np.zeros((len(rows), width), dtype=bool)
    allowed[:, :, :s] = True  # everything sees the shared prefix
    for b, row in enumerate(rows):
        p, n = len(row.prompt), len(row.nodes)
        ids[b, :p] = row.prompt
        ids[b, p : p + n] = row.nodes
        positions[b, :p] = np.arange(row.offset, row.offset + p)
        positions[b, p : p + n] = row.offset + p + np.asarray(row.depths, dtype=np.int64)
        allowed[b, :p, s : s + p] = np.tri(p, dtype=bool)  # causal within the prompt
        allowed[b, p : p + n, s : s + p] = True  # every node sees the whole prompt
        ancestors = np.zeros((n, n), dtype=bool)  # parents come before their children
        for k, parent in enumerate(row.parents):
            if parent >= 0:
                ancestors[k] = ancestors[parent]
            ancestors[k, k] = True
        allowed[b, p : p + n, s + p : s + p + n] = ancestors
        padding = np.arange(p + n, width)
        allowed[b, padding, s + padding] = True  # padding sees itself only (never read)
        keep[b, p - 1 : p + n] = True
    return torch.from_numpy(ids), torch.from_numpy(positions), additive_mask(allowed, dtype), torch.from_numpy(keep)


def additive_mask(allowed: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D additive attention mask [B, 1, T, S] of a boolean [B, T, S] (True: may attend)."""
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~torch.from_numpy(allowed), torch.finfo(dtype).min)
    return mask[:, None]


LOGSOFTMAX_ROWS = {"cpu": 32}  # rows per log-softmax chunk; other devices: 1024 (one kernel launch per chunk)


def read_logprobs(logits: torch.Tensor, flat_index: torch.Tensor, tokens: torch.Tensor, chunk: int | None = None):
    """log p(token) at row ``flat_index`` of ``logits`` [M, V] for each read, in fp32. [R]

    The log-softmax runs over ``chunk`` rows at a time (on a CPU 32: a fused fp32 output small
    enough to stay in the cache, ~1.4x faster than whole-tensor ops; on a GPU 1024, where each
    chunk is a kernel launch), and only the read entries are kept.
    """
    chunk = chunk or LOGSOFTMAX_ROWS.get(logits.device.type, 1024)
    values = torch.empty(len(flat_index), dtype=torch.float32, device=logits.device)
    order = torch.argsort(flat_index, stable=True)
    edges = torch.arange(0, len(logits) + chunk, chunk, device=logits.device)
    bounds = torch.searchsorted(flat_index[order], edges).tolist()
    for i, start in enumerate(range(0, len(logits), chunk)):
        picked = order[bounds[i] : bounds[i + 1]]
        if len(picked):
            logprobs = F.log_softmax(logits[start : start + chunk], dim=-1, dtype=torch.float32)
            values[picked] = logprobs[flat_index[picked] - start, tokens[picked]]
    return values


def _group_passes(rows: Sequence[PackedRow], batch_tokens: int) -> list[list[PackedRow]]:
    """Rows sorted by length, longest first, in passes of at most ``batch_tokens`` padded tokens
    (a row longer than that runs alone)."""
    ordered = sorted(rows, key=len, reverse=True)
    passes: list[list[PackedRow]] = []
    for row in ordered:
        if passes and (len(passes[-1]) + 1) * len(passes[-1][0]) <= batch_tokens:
            passes[-1].append(row)
        else:
            passes.append([row])
    return passes


@torch.no_grad()
def score_continuations(
    model,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    shared: SharedPrefix | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    normalization: str = "mean",
    pad_id: int = 0,
) -> list[torch.Tensor]:
    """Log-probability of each user's continuations after that user's prompt. One [K_u] per user.

    ``normalization``: ``mean`` (per token) or ``sum``. A user whose prompt plus candidates would
    exceed ``batch_tokens`` is split into several rows, each with the whole prompt.
    """
    if normalization not in ("mean", "sum"):
        raise ValueError(f"normalization: {normalization!r} is not allowed; choose mean or sum")
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens: expected an integer >= 1, got {batch_tokens!r}")
    rows: list[PackedRow] = []
    for user, (prompt, conts) in enumerate(zip(prompts, continuations)):
        if any(len(c) == 0 for c in conts):
            raise ValueError("score_continuations: every continuation needs at least one token")
        offset = len(shared.ids) if shared is not None and shared.matches(prompt) else 0
        rest = list(prompt[offset:])
        chunk: list[int] = []
        length = len(rest)  # of the row being filled (upper bound: no shared tree nodes counted)
        for i, cont in enumerate(conts):
            if chunk and length + len(cont) - 1 > batch_tokens:
                rows.append(_row(rest, offset, conts, chunk, user))
                chunk, length = [], len(rest)
            chunk.append(i)
            length += len(cont) - 1
        if chunk:
            rows.append(_row(rest, offset, conts, chunk, user))
    token_logprobs: list[list[torch.Tensor | None]] = [[None] * len(c) for c in continuations]
    for offset in sorted({row.offset for row in rows}):
        group = [row for row in rows if row.offset == offset]
        for batch in _group_passes(group, batch_tokens):
            _score_pass(model, batch, shared if offset else None, pad_id, token_logprobs)
    results = []
    for values in token_logprobs:
        stacked = [v.mean() if normalization == "mean" else v.sum() for v in values]
        results.append(torch.stack(stacked).cpu() if stacked else torch.zeros(0))
    return results


def length_penalized(sums: torch.Tensor, lengths: Sequence[int], penalty: float) -> torch.Tensor:
    """Items' scores from their summed token log-probabilities: ``sums / lengths ** penalty`` (1: the
    mean per token, 0: the sum), the one formula likelihood scoring and generation share. [K]"""
    lengths = torch.tensor(lengths, dtype=sums.dtype)
    return sums / lengths if penalty == 1.0 else sums / lengths**penalty


def _row(rest: list[int], offset: int, conts, chunk: list[int], user: int) -> PackedRow:
    row = prefix_tree_row(rest, offset, [conts[i] for i in chunk])
    row.owner = (user, chunk)
    return row


def _score_pass(model, rows: Sequence[PackedRow], shared: SharedPrefix | None, pad_id: int, out) -> None:
    """One forward pass; writes each continuation's token log-probs [L] into ``out[user][i]``."""
    device = model.device
    s = len(shared.ids) if shared is not None else 0
    ids, positions, mask, keep = pass_tensors(rows, s, pad_id, model.dtype)
    cache = shared.batch_cache(len(rows)) if shared is not None else None
    logits = model(
        input_ids=ids.to(device),
        position_ids=positions.to(device),
        attention_mask=mask.to(device),
        cache=cache,
        use_cache=cache is not None,
        logits_to_keep=keep.to(device),
    ).logits  # [M, V]: the kept positions, row by row
    flat, tokens, spans = [], [], []
    base = 0
    for row in rows:
        for reads in row.reads:
            spans.append((len(flat), len(reads)))
            flat.extend(base + 1 + node for node, _ in reads)  # node -1 = the prompt's last token
            tokens.extend(token for _, token in reads)
        base += 1 + len(row.nodes)
    values = read_logprobs(logits, torch.tensor(flat, device=device), torch.tensor(tokens, device=device)).cpu()
    spans_iter = iter(spans)
    for row in rows:
        user, indices = row.owner
        for i in indices:
            start, length = next(spans_iter)
            out[user][i] = values[start : start + length]


def shared_prefix_scores(
    model,
    prompt_ids: Sequence[int],
    continuations: Sequence[Sequence[int]],
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    normalization: str = "mean",
    shared: SharedPrefix | None = None,
) -> torch.Tensor:
    """Log-probability of each continuation after one prompt (:func:`score_continuations`). [K]"""
    return score_continuations(model, [prompt_ids], [continuations], shared, batch_tokens, normalization)[0]


def verbalizer_scores_batch(
    model,
    prompts: Sequence[Sequence[int]],
    label_token_ids: Sequence[Sequence[int]],
    shared: SharedPrefix | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> list[torch.Tensor]:
    """Per prompt, the log-probabilities of its label tokens as the next token, normalised over
    those labels. One [K_u] per prompt; all prompts in few passes."""
    labels = [[[token] for token in row] for row in label_token_ids]
    raw = score_continuations(model, prompts, labels, shared, batch_tokens, "sum")
    return [F.log_softmax(values, dim=-1) for values in raw]


def verbalizer_scores(
    model, prompt_ids: Sequence[int], label_token_ids: Sequence[int], shared: SharedPrefix | None = None
) -> torch.Tensor:
    """Log-probabilities of the label tokens as the next token, normalised over the labels. [K]"""
    return verbalizer_scores_batch(model, [prompt_ids], [label_token_ids], shared)[0]
