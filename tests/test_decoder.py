"""The packed forward of the beam search: the model's own numbers from the real tokens only, for
each architecture it claims; anything else falls back to the model's forward with the same results."""

import os

import pytest
import torch

from recbole_llmgen import generation
from recbole_llmgen.decoder import PackedDecoder, scratch
from recbole_llmgen.generation import GrowingCache, ItemTrie, batched_constrained_beam_search
from recbole_llmgen.llm import beam_attention

SMALL = dict(vocab_size=2000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.5)  # fmt: skip


def _model(kind: str):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL))
    elif kind == "qwen2":  # biases on q, k, v
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL))
    elif kind == "qwen3":  # norms on q and k
        model = Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=8))
    else:  # a sliding window: not reproduced
        model = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=4))
    return model.eval()


def _pass(n_new: int):
    """Two rows after a 6-token cache: ragged new tokens (row 0: n_new, row 1: 2), a node that
    sees an ancestor, padding that sees itself only."""
    rows = torch.tensor([0] * n_new + [1, 1])
    slots = torch.tensor(list(range(n_new)) + [0, 1])
    ids = torch.randint(10, 2000, (len(rows),))
    positions = 6 + slots
    allowed = torch.zeros(2, n_new, 6 + n_new, dtype=torch.bool)
    allowed[:, :, :6] = True
    allowed[:, torch.arange(n_new), 6 + torch.arange(n_new)] = True
    allowed[0, 1:, 6] = True  # row 0's later tokens see its first
    allowed[0, 100:, 50:60] = n_new > 100  # ... and, when many, some in a chunk before theirs
    allowed[1, 1, 6] = True
    return ids, positions, rows, slots, allowed


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("n_new", [3, 40, 150])  # a beam step, a prompt-sized pass, one attended in chunks
def test_packed_forward_gives_the_models_logits(kind, n_new):
    model = _model(kind)
    decoder = PackedDecoder.of(model)
    assert decoder is not None
    torch.manual_seed(1)
    prompt = torch.randint(10, 2000, (2, 6))
    ids, positions, rows, slots, allowed = _pass(n_new)
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]
    with torch.no_grad():
        start = model(input_ids=prompt, use_cache=True).cache
        padded_ids = torch.zeros(2, n_new, dtype=torch.long)
        padded_ids[rows, slots] = ids
        padded_positions = torch.full((2, n_new), 6)
        padded_positions[rows, slots] = positions
        keep = torch.zeros(2, n_new, dtype=torch.bool)
        keep[rows, slots] = True
        plain = model(input_ids=padded_ids, position_ids=padded_positions, attention_mask=mask,
                      cache=GrowingCache(model, 64, start, 2), use_cache=True).logits[keep]  # fmt: skip
        with beam_attention(model) as cache_dtype:
            # the search's cache (the model's dtype) and an fp32 one (the fp32 beam-step arithmetic),
            # keys transposed; both too small: they grow while writing
            for dtype in None, cache_dtype:
                cache = GrowingCache(model, 8, start, 2, dtype, {}, True)
                packed = decoder(ids, positions, rows, slots, n_new, cache, mask, pool={})
                assert packed.shape == plain.shape
                assert torch.allclose(packed, plain, atol=1e-4)
                assert cache.get_seq_length() == 6 + n_new


def test_an_architecture_it_does_not_reproduce_takes_the_models_forward():
    model = _model("mistral")
    assert PackedDecoder.of(model) is None
    texts = [[300, 301], [300, 302, 303], [305]]
    trie = ItemTrie(texts, [1, 2, 3])
    prompts = [[11, 12, 13], [14, 15]]
    found = batched_constrained_beam_search(model, prompts, trie, 3)
    assert [sorted(i for i, _ in user) for user in found] == [[1, 2, 3], [1, 2, 3]]


def test_the_packed_and_the_models_forward_rank_alike(tiny_llm, monkeypatch):
    model, tokenizer = tiny_llm
    texts = [[300 + (i * 7) % 11, 320 + i % 3, 330 + i] for i in range(12)] + [[350, 351, 352, 353, 354]]
    trie = ItemTrie(texts, list(range(1, len(texts) + 1)))
    prompts = [tokenizer(f"user {i} watched" + " a film" * i, add_special_tokens=False)["input_ids"] for i in range(3)]
    seen = [[1], [], [2, 3]]
    pool = {}
    batched_constrained_beam_search(model, prompts, trie, 4, seen=seen, pool=pool)
    torch.manual_seed(3)
    for buffer in pool.values():  # what the last batch left (finite numbers): the next must not read it
        buffer.copy_(torch.randn(buffer.shape) * 30)
    packed = batched_constrained_beam_search(model, prompts, trie, 4, seen=seen, pool=pool)
    monkeypatch.setattr(generation.PackedDecoder, "of", staticmethod(lambda model: None))
    plain = batched_constrained_beam_search(model, prompts, trie, 4, seen=seen)
    assert [[i for i, _ in u] for u in packed] == [[i for i, _ in u] for u in plain]
    for a, b in zip(packed, plain):
        assert dict(a) == pytest.approx(dict(b), abs=1e-4)


def test_a_pool_hands_the_next_batch_the_same_buffers():
    pool = {}
    first = scratch(pool, "k", (4, 3, 10), torch.float32, "cpu")
    smaller = scratch(pool, "k", (2, 3, 7), torch.float32, "cpu")
    assert smaller.data_ptr() == first.data_ptr() and smaller.shape == (2, 3, 7)
    larger = scratch(pool, "k", (4, 3, 12), torch.float32, "cpu")
    assert larger.data_ptr() != first.data_ptr() and pool["k"].shape == (4, 3, 12)
    assert scratch(None, "k", (1,), torch.float32, "cpu").shape == (1,)  # no pool: a new tensor
    # new buffers are zeros (finite: an unused column of the search's cache is never cleared)
    assert not scratch({}, "k", (64, 64), torch.bfloat16, "cpu").any()
    assert not scratch(pool, "k", (8, 3, 12), torch.float32, "cpu").any()


def test_the_allocator_keeps_memory_in_the_outermost_block_only_and_is_restored(monkeypatch):
    from recbole_llmgen import decoder

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("malloc_trim", pad))
            return 1

    monkeypatch.setattr(decoder, "_glibc", lambda: FakeLibc())
    with decoder.allocator_keeps_memory():
        with decoder.allocator_keeps_memory():  # a search inside the Generator's block
            assert len(calls) == 2
        assert len(calls) == 2  # the inner block changed nothing
    assert calls[0] == ("mallopt", decoder._M_MMAP_THRESHOLD, 32 << 20)
    assert calls[1][:2] == ("mallopt", decoder._M_TRIM_THRESHOLD) and 0 < calls[1][2] < 2**31  # a C int
    assert calls[2:] == [("mallopt", decoder._M_TRIM_THRESHOLD, 64 << 20), ("malloc_trim", 0)]  # kept memory back
    with pytest.raises(RuntimeError):  # restored on an error too
        with decoder.allocator_keeps_memory():
            raise RuntimeError
    assert calls[-2:] == [("mallopt", decoder._M_TRIM_THRESHOLD, 64 << 20), ("malloc_trim", 0)]
    assert not decoder._keeping


def test_memory_kept_in_the_block_goes_back_to_the_system_when_it_ends():
    """On glibc: 4 MB blocks (below the 32 MB mapping threshold: heap memory) freed inside the block
    stay with the process; when the block ends they go back (resident memory drops)."""
    import numpy as np

    from recbole_llmgen import decoder

    if decoder._glibc() is None or not os.path.exists("/proc/self/statm"):
        pytest.skip("glibc's allocator only (elsewhere the block changes nothing)")

    def resident_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    with decoder.allocator_keeps_memory():
        blocks = [np.ones(1 << 19) for _ in range(64)]  # 64 x 4 MB, every page touched
        del blocks
        kept = resident_mb()
    after = resident_mb()
    assert kept - after > 128, (kept, after)  # most of the 256 MB went back
