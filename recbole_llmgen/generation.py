"""Direct generation of catalogue items: a prefix tree of item token ids and a beam search that
can only walk it, so every finished beam is exactly one catalogue text.

Item scores are the summed log-probability of the item's tokens after the prompt / its token count
** ``length_penalty`` (1: the mean), the number likelihood scoring gives the same item (beams are
ranked while searching by their summed log-probability, as usual; finished items by that score).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from recbole_llmgen.decoder import SCRATCH_COLUMNS, PackedDecoder, allocator_keeps_memory, scratch
from recbole_llmgen.llm import beam_attention
from recbole_llmgen.scoring import (
    PackedRow,
    ScopedCache,
    SharedPrefix,
    additive_mask,
    length_penalized,
    pass_tensors,
    read_logprobs,
)


class _GrowingLayer(DynamicLayer):
    """One layer's keys and values in buffers with room for ``capacity`` columns: a pass writes its
    new columns in place and attention reads a view of the filled ones. (``DynamicLayer``
    concatenates: the whole cache was copied at every beam step.) Grows by half if full.
    With a ``pool``, the buffers are :func:`~recbole_llmgen.decoder.scratch` ones under ``key``.
    ``keys_transposed``: keys kept as [rows, heads, d, columns], the layout a bf16 matmul reads
    fastest (:meth:`put`; ``keys`` stays the usual [rows, heads, columns, d] view).

    Buffers are zero when allocated and only ever receive keys and values, so a column not
    written yet (a pass's unused one, or one a previous batch of a pooled buffer left) holds finite
    numbers: the additive mask gives it a weight of exactly zero."""

    def __init__(self, capacity: int, dtype=None, pool: dict | None = None, key=None, keys_transposed=False):
        super().__init__()
        self.capacity, self.length, self.dtype, self.pool, self.key = capacity, 0, dtype, pool, key
        self.transposed = keys_transposed

    def _buffers(self, rows: int, heads: int, columns: int, d: int, dtype, device):
        if self.pool is not None:
            columns = -(-columns // SCRATCH_COLUMNS) * SCRATCH_COLUMNS
        shapes = {"k": (rows, heads, d, columns) if self.transposed else (rows, heads, columns, d),
                  "v": (rows, heads, columns, d)}  # fmt: skip
        return tuple(scratch(self.pool, (self.key, part), shapes[part], dtype, device) for part in "kv")

    def lazy_initialization(
        self, key_states: torch.Tensor, value_states: torch.Tensor, rows: int | None = None
    ) -> None:
        self.device = key_states.device
        rows = rows or key_states.shape[0]
        dtype = self.dtype or key_states.dtype
        self._keys, self._values = self._buffers(rows, key_states.shape[1], self.capacity, key_states.shape[-1], dtype,
                                                 self.device)  # fmt: skip
        self.is_initialized = True

    def _columns(self, buffer: torch.Tensor, start: int, end: int, keys: bool) -> torch.Tensor:
        """Columns [start, end) of a buffer (keys: along their last axis when transposed)."""
        return buffer[..., start:end] if keys and self.transposed else buffer[:, :, start:end]

    def _room(self, end: int) -> None:
        """Buffers of at least ``end`` columns (half as many again), the filled ones kept."""
        if end > self._values.shape[2]:
            rows, heads, columns, d = self._values.shape
            keys, values = self._buffers(
                rows, heads, max(end, columns + columns // 2), d, self._values.dtype, self.device
            )
            self._columns(keys, 0, self.length, True).copy_(self._columns(self._keys, 0, self.length, True))
            values[:, :, : self.length] = self._values[:, :, : self.length]
            self._keys, self._values = keys, values

    def _filled(self, end: int):
        self.length = end
        keys = self._columns(self._keys, 0, end, True)
        self.keys, self.values = (keys.transpose(2, 3) if self.transposed else keys), self._values[:, :, :end]
        return self.keys, self.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._room(end)
        self._columns(self._keys, self.length, end, True).copy_(
            key_states.transpose(2, 3) if self.transposed else key_states
        )
        self._values[:, :, self.length : end] = value_states
        return self._filled(end)

    def put(self, rows: torch.Tensor, columns: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor,
            batch: int, step: int):  # fmt: skip
        """``step`` new columns in each of the ``batch`` rows: token k's key and value [N, heads, d]
        at (``rows[k]``, ``columns[k]``); the other new columns keep what they hold (finite, masked).
        Returns the filled keys as [rows, heads, d, columns] and values [rows, heads, columns, d]
        (:class:`~recbole_llmgen.decoder.PackedDecoder`, whose cache keeps its keys transposed)."""
        if not self.transposed:
            raise ValueError("put: a cache with keys_transposed=True (the packed forward's layout) was expected")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states, rows=batch)
        self._room(self.length + step)
        self._keys[rows, :, :, columns] = key_states.to(self._keys.dtype)
        self._values[rows, :, columns] = value_states.to(self._values.dtype)
        self._filled(self.length + step)
        return self._columns(self._keys, 0, self.length, True), self.values

    def get_seq_length(self) -> int:
        return self.length


class GrowingCache(Cache):
    """A KV cache of ``rows`` rows with room for ``capacity`` columns per layer (:class:`_GrowingLayer`),
    starting with the columns of ``start`` (a cache of ``rows`` rows, or of one row repeated), kept
    in ``dtype`` (default: the model's; fp32 for :func:`~recbole_llmgen.llm.beam_attention_forward`),
    its buffers from ``pool`` when given (:func:`~recbole_llmgen.decoder.scratch`), keys transposed
    when ``keys_transposed`` (:class:`~recbole_llmgen.decoder.PackedDecoder`'s layout)."""

    def __init__(self, model, capacity: int, start: Cache | None = None, rows: int = 1, dtype=None, pool=None,
                 keys_transposed: bool = False):  # fmt: skip
        layers = model.config.get_text_config().num_hidden_layers
        super().__init__(layers=[_GrowingLayer(capacity, dtype, pool, i, keys_transposed) for i in range(layers)])
        for layer, source in zip(self.layers, start.layers if start is not None else []):
            layer.update(source.keys.expand(rows, -1, -1, -1), source.values.expand(rows, -1, -1, -1))


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
        self.token: list[int] = [-1]  # the token leading to each node
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
                    self.token.append(int(token))
                node = nxt
                paths.setdefault(int(item), []).append(node)
            self.items[node].append(int(item))
        for ids in self.items:
            ids.sort()
        self.paths = {item: np.asarray(nodes, dtype=np.int64) for item, nodes in paths.items()}
        self.depth = max(len(tokens) for tokens in sequences) if len(sequences) else 0  # the longest text's tokens
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
    pool: dict | None = None,
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
    On a CPU, a Llama-style model's passes run on the real tokens only
    (:class:`~recbole_llmgen.decoder.PackedDecoder`). ``pool``: a dict that keeps the KV cache's,
    padded queries' and logits' buffers for the next call (:func:`~recbole_llmgen.decoder.scratch`;
    one search at a time).
    """
    if num_beams < 1:
        raise ValueError(f"num_beams: expected an integer >= 1, got {num_beams}")
    with beam_attention(model) as cache_dtype, allocator_keeps_memory():
        return _beam_search(model, prompts, trie, num_beams, pad_token_id, seen, shared, counts, length_penalty,
                            cache_dtype, pool)  # fmt: skip


def _beam_search(
    model, prompts, trie, num_beams, pad_token_id, seen, shared, counts, length_penalty, cache_dtype, pool
):
    device, dtype = model.device, model.dtype
    seen_sets = [set(s) for s in seen] if seen is not None else [set() for _ in prompts]
    dead = [trie.exhausted(s) for s in seen_sets]
    offset = len(shared.ids) if shared is not None and all(shared.matches(p) for p in prompts) else 0
    rows = [PackedRow(list(p[offset:]), offset) for p in prompts]
    ids, positions, mask, keep = pass_tensors(rows, offset, pad_token_id, dtype)
    # the beam steps' cache: the prompts', with room for the passes of ~8 trie levels (at most
    # max(num_beams, CHAIN_ROOM) new columns a pass; forced chains take fewer passes): ml-100k's 25-level
    # trie ends its batches at 310-380 columns, 13 + 173 of them the prompts'. Grows if needed.
    room = offset + ids.shape[1] + max(num_beams, CHAIN_ROOM) * min(trie.depth, 8)
    decoder = PackedDecoder.of(model) if cache_dtype is not None else None  # a CPU: the packed forward
    if decoder is not None:
        # the cache in the model's dtype, keys transposed: the attention's matmuls read it as it is
        cache = GrowingCache(model, room, shared.cache if offset else None, len(rows), None, pool, True)
        lengths = torch.tensor([len(r.prompt) for r in rows])
        real = torch.arange(ids.shape[1]) < lengths[:, None]
        logits = decoder(*_real_tokens(ids, positions, real, device), ids.shape[1], cache, mask.to(device),
                         (lengths.cumsum(0) - 1).to(device), pool)  # fmt: skip
    else:
        out = model(
            input_ids=ids.to(device),
            position_ids=positions.to(device),
            attention_mask=mask.to(device),
            cache=shared.batch_cache(len(rows)) if offset else None,
            use_cache=True,
            logits_to_keep=keep.to(device),
        )
        logits = out.logits  # [users, V]: each prompt's last position
        cache = GrowingCache(model, room, out.cache, len(rows), cache_dtype, pool)
    counts = counts if counts is not None else {}
    counts["prompt_tokens"] = counts.get("prompt_tokens", 0) + sum(len(r.prompt) for r in rows)
    state = _Rows(
        width=offset + ids.shape[1],  # columns in the cache
        prompt_columns=[offset + len(r.prompt) for r in rows],  # user u sees columns [0, this)
        next_position=[offset + len(r.prompt) for r in rows],  # position of a depth-1 token
        node_columns=[{0: []} for _ in prompts],  # trie node -> its path's columns
    )
    # values[u][node]: log-probs of the node's children (trie order), once the node has been fed
    values: list[dict[int, list[float]]] = [{} for _ in prompts]
    _store_values(values, logits, [(user, 0) for user in range(len(prompts))], trie)
    # one entry per live beam: (user, trie node, summed log-prob, length)
    beams = [(user, 0, 0.0, 0) for user in range(len(prompts))]
    finished: list[dict[int, tuple[float, int]]] = [{} for _ in prompts]  # item -> (summed log-prob, tokens)
    while beams:
        per_user: dict[int, list] = {}
        for row, (user, node, total, length) in enumerate(beams):
            for (token, child), value in zip(trie.children[node].items(), values[user][node]):
                if child not in dead[user]:
                    per_user.setdefault(user, []).append((total + value, row, token, child, length + 1))
        live = []
        for user in sorted(per_user):
            for total, _, _token, child, length in sorted(per_user[user], key=lambda e: (-e[0], e[1], e[2]))[
                :num_beams
            ]:
                for item in trie.items[child]:
                    if item not in seen_sets[user]:
                        finished[user][item] = (total, length)
                if trie.children[child]:
                    live.append((user, child, total, length))
        if not live:
            break
        todo = [(user, child, length) for user, child, _, length in live if child not in values[user]]
        if todo:  # beams on nodes fed ahead (a forced chain) need no pass
            fed, logits = _feed(model, decoder, cache, todo, trie, dead, state, pad_token_id, pool)
            _store_values(values, logits, fed, trie)
            counts["beam_tokens"] = counts.get("beam_tokens", 0) + len(fed)
            counts["steps"] = counts.get("steps", 0) + 1
        beams = live
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


@dataclass
class _Rows:
    """Where each user's row of the search's KV cache stands."""

    width: int  # columns in the cache (every row)
    prompt_columns: list[int]  # user u's prompt occupies columns [0, this)
    next_position: list[int]  # position id of user u's depth-1 tokens
    node_columns: list[dict[int, list[int]]]  # per user: trie node -> the columns of its path


CHAIN_ROOM = 16  # tokens a row may take in one pass to feed forced chains ahead (when fewer beams need it)


def _feed(model, decoder, cache, todo, trie, dead, rows: _Rows, pad_id: int, pool=None):
    """One pass: the token of every node in ``todo`` ((user, node, depth): a live beam's node whose
    children's log-probs are not known yet) as a new column of its user's row, each attending to its
    user's prompt and its own path only (an additive 4-D mask). A pass has as many new columns as
    the busiest row needs; the spare columns of the other rows feed *forced chains* ahead: a node
    with a single allowed child (the middle of a long title) is fed together with that child, so
    the beam's next steps need no pass of their own (a beam pruned later only wasted a spare
    column). With few beams left a row may take up to ``CHAIN_ROOM`` columns for them (a pass
    costs ~40 ms of weights streamed however few its tokens, a token ~1 ms: 2-core EPYC, bf16).

    Returns the fed (user, node) pairs in row order and their logits [fed, V]."""
    users = len(rows.node_columns)
    per_row: list[list[tuple[int, int]]] = [[] for _ in range(users)]  # per user: (node, depth) to feed
    for user, node, depth in todo:
        per_row[user].append((node, depth))
    step = max(max(len(r) for r in per_row), CHAIN_ROOM)
    fed_per_row = []
    for user, entries in enumerate(per_row):
        chains = [[entry] for entry in entries]
        room, growing = step - len(entries), chains
        while room > 0 and growing:  # extend each chain by its forced next node, round-robin
            still = []  # the chains extended this round (one that ended never extends again)
            for chain in growing:
                if len(still) == room:
                    break
                nxt = _forced_child(trie, chain[-1][0], dead[user])
                if nxt is not None:
                    chain.append((nxt, chain[-1][1] + 1))
                    still.append(chain)
            room, growing = room - len(still), still
        fed_per_row.append([entry for chain in chains for entry in chain])  # a parent before its child
    step = max(len(r) for r in fed_per_row)
    width = rows.width
    ids = np.full((users, step), pad_id, dtype=np.int64)
    positions = np.zeros((users, step), dtype=np.int64)
    keep = np.zeros((users, step), dtype=bool)
    path_at: list[tuple[int, int, int]] = []  # (user, slot, column) of every fed node's path
    fed: list[tuple[int, int]] = []
    for user, entries in enumerate(fed_per_row):
        columns = rows.node_columns[user]
        for j, (node, depth) in enumerate(entries):
            path = columns[trie.parent[node]] + [width + j]  # the parent: fed before, or earlier in this row
            columns[node] = path
            ids[user, j] = trie.token[node]
            positions[user, j] = rows.next_position[user] + depth - 1
            keep[user, j] = True
            path_at.extend((user, j, column) for column in path)
            fed.append((user, node))
    # a node sees its user's prompt and its own path; padding sees only itself
    allowed = (np.arange(width + step) < np.asarray(rows.prompt_columns)[:, None])[:, None, :] & keep[:, :, None]
    allowed[:, np.arange(step), width + np.arange(step)] = True
    u, j, c = np.asarray(path_at).T
    allowed[u, j, c] = True
    device, mask = model.device, additive_mask(allowed, model.dtype).to(model.device)
    if decoder is not None:  # the real tokens only, row after row
        tokens = _real_tokens(*(torch.from_numpy(a) for a in (ids, positions, keep)), device)
        logits = decoder(*tokens, step, cache, mask, pool=pool)
    else:
        logits = model(
            input_ids=torch.from_numpy(ids).to(device),
            position_ids=torch.from_numpy(positions).to(device),
            attention_mask=mask,
            cache=cache,
            use_cache=True,
            logits_to_keep=torch.from_numpy(keep).to(device),
        ).logits  # [fed, V], row by row: user 0's nodes, then user 1's...
    rows.width = width + step
    return fed, logits


def _real_tokens(ids: torch.Tensor, positions: torch.Tensor, real: torch.Tensor, device):
    """The real tokens of a padded pass [rows, step] (``real``: bool), row after row, as
    :class:`~recbole_llmgen.decoder.PackedDecoder` takes them: ids, positions, rows, slots [N]."""
    rows, slots = real.nonzero(as_tuple=True)
    return tuple(t.to(device) for t in (ids[real], positions[real], rows, slots))


def _forced_child(trie: ItemTrie, node: int, dead: set[int]) -> int | None:
    """The only child of ``node`` a beam there could enter, when it has children of its own (so its
    log-probs will be needed); else None."""
    allowed = [child for child in trie.children[node].values() if child not in dead]
    return allowed[0] if len(allowed) == 1 and trie.children[allowed[0]] else None


def _store_values(values, logits: torch.Tensor, fed: list[tuple[int, int]], trie: ItemTrie) -> None:
    """values[user][node] = the log-probs of the node's children, read from row k of ``logits`` for
    the k-th (user, node) of ``fed``."""
    flat = iter(_allowed_logprobs(logits, [node for _, node in fed], trie))
    for user, node in fed:
        values[user][node] = [next(flat) for _ in trie.children[node]]


def _allowed_logprobs(logits: torch.Tensor, nodes: list[int], trie: ItemTrie) -> list[float]:
    """For row k of ``logits``, the log-probabilities of the tokens trie node ``nodes[k]`` allows,
    in the order of ``trie.children[node]``, row after row. Normalised over the whole vocabulary on
    the model's device, a block of rows at a time (:func:`~recbole_llmgen.scoring.read_logprobs`: a
    whole [rows, vocabulary] fp32 copy left the CPU's caches); only the allowed entries are copied
    to the host."""
    rows, tokens = [], []
    for row, node in enumerate(nodes):
        children = trie.children[node]
        rows.extend([row] * len(children))
        tokens.extend(children)
    device = logits.device
    return read_logprobs(logits, torch.tensor(rows, device=device), torch.tensor(tokens, device=device)).tolist()


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
        # the searches' buffers (KV cache, queries, logits: decoder.scratch), kept from one call to the
        # next (an evaluation calls once per batch of users) until the weights change: fresh memory is
        # zeroed and page-faulted in, ~1 s for the bundled model's 300 MB on a 2-core EPYC
        self._pool: dict = {}
        self._sessions = 0  # open session() blocks: the buffers are kept between calls only inside one

    @contextlib.contextmanager
    def session(self):
        """Within this block the searches' buffers and the allocator's kept memory
        (:func:`~recbole_llmgen.decoder.allocator_keeps_memory`) last from one call to the next (an
        evaluation calls once per batch of users); when the outermost block ends both are let go.
        Outside any block each call lets them go when it returns."""
        with allocator_keeps_memory():
            self._sessions += 1
            try:
                yield
            finally:
                self._sessions -= 1
                if not self._sessions:
                    self._pool.clear()

    def cached(self):
        """Within this block each (history, request, seen items)'s generation runs once (the
        fusion grid evaluates the same users eleven times); nothing is kept after it."""
        return self.cache.scope()

    def weights_changed(self) -> None:
        """The LLM's weights changed (or training starts): generations computed before are void,
        and the searches' buffers are let go until the next search."""
        self.cache.clear()
        self._pool = {}

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
        # users of like prompt lengths share a batch (stable order): a batch pads its prompts to its
        # longest, and every beam step attends over that width
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        found: list = [None] * len(prompts)
        per, pool = s.generation_users_per_batch, self._pool  # the batches reuse one set of buffers
        with allocator_keeps_memory():  # ... and the allocator its memory
            try:
                for start in range(0, len(order), per):
                    batch = order[start : start + per]
                    results = batched_constrained_beam_search(
                        self.llm, [prompts[i] for i in batch], self.trie(), s.num_beams,
                        self.prompts.tokenizer.pad_token_id, seen=[seen[i] for i in batch], shared=shared,
                        counts=self.counts, length_penalty=0.0, pool=pool,
                    )  # fmt: skip
                    for i, pairs in zip(batch, results):
                        found[i] = pairs
            finally:
                if not self._sessions:  # nobody keeps them: let go before the allocator gives memory back
                    pool.clear()
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
