"""The beam search's forward passes over packed tokens (a CPU, Llama-style decoders).

A batched forward pass of a Hugging Face model runs every token-wise part (norms, projections,
MLP) on [rows, columns], padding included. The beam search's passes are ragged: a pass has as many
new columns as its busiest row needs (20 beams in a user's heavy steps, 1-3 in its tail) and the
other rows pad up to it (20% of the columns on ml-100k with 8 users a pass, more with more users).
:class:`PackedDecoder` runs the token-wise parts on the real tokens only, [N, hidden], and only
attention on the [rows, columns] layout, reading and writing the rows of the search's KV cache (a
:class:`~recbole_llmgen.generation.GrowingCache`) in place. So a pass's cost follows its real
tokens, not its rows x columns, and a pass can take many users at once.

It calls the model's own modules (embedding, norms, projections, rotary embedding, MLP, output
layer), so LoRA adapters, merged or not, and the model's dtype work as in its own forward; the
attention arithmetic is :func:`~recbole_llmgen.llm.packed_head_attention`, the one the model's passes
use during the search. Supported: decoders whose layers are Llama's (``model_type`` llama, qwen2,
qwen3, mistral) without a sliding window; :meth:`PackedDecoder.of` returns None for anything else,
and the search then takes the model's forward.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools

import torch
from transformers.models.llama.modeling_llama import rotate_half

from recbole_llmgen.llm import packed_head_attention

LLAMA_STYLE = {"llama", "mistral", "qwen2", "qwen3"}
SCRATCH_COLUMNS = 128  # a pooled cache buffer's columns are a multiple of this (reused by the next batch)
# a pass with more new tokens a row (a prompt) attends in chunks of this many, each over the columns up to
# its last token: 3 chunks skip ~30% of a 175-token prompt's causal attention
QUERY_CHUNK = 64


def scratch(pool: dict | None, key, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A tensor of ``shape`` (KV cache, padded queries, logits): a view of ``pool[key]`` when that
    is at least as large in every dimension (its leading part, holding what its last user left),
    else a new one of zeros, kept there. The beam search allocates its KV cache and logits afresh
    for every batch of users, hundreds of MB that the allocator hands back to the system and gets
    again, every page faulted in anew (~10% of the search on a 2-core EPYC); a pool that lives
    across one call's batches allocates them once. ``pool`` None: new zeros every time.

    Zeros, not uninitialised memory: the beam search's buffers then only ever hold finite numbers
    (keys, values, queries), so a column or query slot a pass leaves unused needs no clearing (the
    mask gives it a weight of exactly zero; 0 x NaN would not be zero)."""
    held = pool.get(key) if pool is not None else None
    if held is None or held.dtype != dtype or held.dim() != len(shape) or any(h < n for h, n in zip(held.shape, shape)):
        held = torch.zeros(shape, dtype=dtype, device=device)
        if pool is not None:
            pool[key] = held
    return held[tuple(slice(0, n) for n in shape)]


_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


class PackedDecoder:
    """A forward pass of a Llama-style decoder over packed tokens (see the module's note)."""

    def __init__(self, model):
        inner = model.model
        self.embed, self.layers, self.norm, self.rotary = (
            model.get_input_embeddings(),
            inner.layers,
            inner.norm,
            inner.rotary_emb,
        )
        self.head = model.get_output_embeddings()
        attention = self.layers[0].self_attn
        config = model.config.get_text_config()
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            attention.head_dim,
        )
        self.scaling = attention.scaling

    @staticmethod
    def of(model) -> PackedDecoder | None:
        """The packed forward of ``model`` (a peft model: its base model, adapters in place), or
        None when its architecture is not one this forward reproduces."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config.get_text_config()
        if config.model_type not in LLAMA_STYLE or _sliding(config):
            return None
        inner = getattr(base, "model", None)
        if inner is None or not all(hasattr(inner, part) for part in ("layers", "norm", "rotary_emb", "embed_tokens")):
            return None
        for layer in inner.layers:
            if not all(hasattr(layer, part) for part in _LAYER_PARTS):
                return None
            if not all(hasattr(layer.self_attn, part) for part in _ATTENTION_PARTS):
                return None
        if base.get_output_embeddings() is None or config.num_attention_heads % config.num_key_value_heads:
            return None
        return PackedDecoder(base)

    @torch.no_grad()
    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        slots: torch.Tensor,
        step: int,
        cache,
        mask: torch.Tensor,
        keep: torch.Tensor | None = None,
        pool: dict | None = None,
    ) -> torch.Tensor:
        """Logits [K, V] of the kept tokens (``keep``: indices into the N tokens; None: all), in order.

        Token k (``ids[k]`` at position ``positions[k]``) is column ``width + slots[k]`` of row
        ``rows[k]`` of ``cache`` (``width``: its columns before this pass; ``step`` new columns a
        row, the unused ones holding finite numbers). ``mask``: additive [rows, 1, step, width +
        step]: what each new column may attend to (an unused column should see at least itself;
        none may see a later new column, as causal masks and the search's tree masks are).
        ``pool``: where the queries' and logits' buffers are reused from (:func:`scratch`)."""
        layers = cache.layers
        width, batch = layers[0].get_seq_length(), mask.shape[0]
        heads, kv_heads, d = self.heads, self.kv_heads, self.head_dim
        groups = heads // kv_heads
        h = self.embed(ids)  # [N, hidden]
        n = h.shape[0]
        cos, sin = self.rotary(h[None], positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [N, 1, d]
        flat = rows * step + slots  # each token's place in the [rows * step] layout
        columns = width + slots
        # queries packed per key/value head, slot-major (slot i's query head g of a key/value head at
        # i * groups + g), so a range of slots is a range of rows and a chunk of a prompt's tokens
        # attends over the columns up to its last one only (a token never sees a later one)
        mask = mask.float()[:, :, :, None].expand(batch, 1, step, groups, width + step)
        mask = mask.reshape(batch, 1, step * groups, width + step)  # once a pass, not once a layer
        chunks = [(a, min(a + QUERY_CHUNK, step)) for a in range(0, step, QUERY_CHUNK)]
        for layer, stored in zip(self.layers, layers):
            attention = layer.self_attn
            x = layer.input_layernorm(h)
            q = attention.q_proj(x).view(n, heads, d)
            k = attention.k_proj(x).view(n, kv_heads, d)
            v = attention.v_proj(x).view(n, kv_heads, d)
            if hasattr(attention, "q_norm"):  # qwen3
                q, k = attention.q_norm(q), attention.k_norm(k)
            # the model's rotary arithmetic (llama's, as qwen's and mistral's), on q and k at once
            qk = torch.cat((q, k), dim=1)
            qk = torch.addcmul(qk * cos, rotate_half(qk), sin)
            q, k = qk[:, :heads], qk[:, heads:]
            keys, values = stored.put(rows, columns, k, v, batch, step)  # keys [rows, kv, d, columns]
            padded = scratch(pool, "queries", (batch * step, heads, d), q.dtype, q.device)  # unused slots: finite
            padded[flat] = q
            padded = padded.view(batch, step, kv_heads, groups, d).transpose(1, 2).reshape(batch, kv_heads, -1, d)
            out = self._attend(padded, keys, values, mask, width, chunks)  # [rows, kv, step * groups, d]
            # -> the real tokens' [N, heads * d]
            out = out.view(batch, kv_heads, step, groups, d).transpose(1, 2)[rows, slots].reshape(n, heads * d)
            h = h + attention.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if keep is not None:
            h = h[keep]
        h = self.norm(h)
        head = self.head
        if type(head) is not torch.nn.Linear or head.bias is not None:
            return head(h)
        out = scratch(pool, "logits", (h.shape[0], head.out_features), h.dtype, h.device)
        return torch.mm(h, head.weight.t(), out=out)

    def _attend(self, queries, keys, values, mask, width: int, chunks: list[tuple[int, int]]) -> torch.Tensor:
        """Attention of slot-major packed ``queries`` [rows, kv, step * groups, d] over ``keys``
        [rows, kv, d, width + step] and ``values``, chunk by chunk of slots [a, e), each over the
        columns before ``width + e`` (a token sees no later one)."""
        g = self.heads // self.kv_heads
        if len(chunks) == 1:
            return packed_head_attention(queries, keys, values, mask, self.scaling, chunks[0][1])
        parts = [
            packed_head_attention(
                queries[:, :, a * g : e * g],
                keys[..., : width + e],
                values[:, :, : width + e],
                mask[:, :, a * g : e * g, : width + e],
                self.scaling,
                e - a,
            )  # fmt: skip
            for a, e in chunks
        ]
        return torch.cat(parts, dim=2)


def _sliding(config) -> bool:
    """Whether attention is limited to a window (mistral's ``sliding_window``; qwen's when ``use_sliding_window``)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return False
    return config.model_type == "mistral" or bool(getattr(config, "use_sliding_window", False))


# glibc's mallopt parameters and the values its dynamic thresholds reach at most (64-bit)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_MAX, _TRIM_AFTER = 32 << 20, 64 << 20
_KEEP = (1 << 31) - 1  # (a C int) bytes free at the heap's top before any goes back
_keeping = False  # an outer block is active (the Generator's, around its batches)


@functools.cache
def _glibc():
    """glibc's C library when this process runs on it (it has ``mallopt``), else None."""
    try:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") else None
    except OSError:
        return None


@contextlib.contextmanager
def allocator_keeps_memory():
    """While the block runs, glibc's allocator keeps freed memory for reuse instead of handing it
    back to the system. A pass's intermediates are 2-6 MB each (a prompt pass of 16 users: ~1,800
    tokens x 1,536 features): above glibc's thresholds they are mapped afresh and every page faulted
    in at each allocation; an RMSNorm over [1800, 576] took 1.2 ms so, 0.5 ms with the memory kept, a
    gated MLP's elementwise part 10 ms against 1.7 ms (2-core EPYC). When the outermost block ends
    the memory kept goes back to the system (``malloc_trim``), and the thresholds are the highest
    glibc's own adaptive ones reach (32 MB mapped, 64 MB kept free at the heap's top): glibc has no
    call that turns its adaptive thresholds back on once ``mallopt`` set one, so these ceilings, which
    a long-running torch process reaches anyway, are the nearest to before. Nested blocks: the
    outermost one counts. Elsewhere than glibc: nothing changes."""
    global _keeping
    libc = _glibc()
    if libc is None or _keeping:  # elsewhere, or inside an outer block: as it is
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _KEEP)
    _keeping = True
    try:
        yield
    finally:
        _keeping = False
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_AFTER)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)  # what the block kept goes back now, not at some later free
