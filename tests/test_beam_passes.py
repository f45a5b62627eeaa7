"""The beam search's passes: forced chains fed ahead, the preallocated KV cache, the packed-head
attention. Each must give the numbers the plain way gives (fp32 tiny model), in fewer or cheaper passes."""

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recbole_llmgen import generation
from recbole_llmgen.generation import GrowingCache, ItemTrie, batched_constrained_beam_search
from recbole_llmgen.llm import beam_attention

SLOW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# few token ids: texts share prefixes (branching) and long tails (forced chains)
TEXTS = st.lists(st.lists(st.integers(min_value=300, max_value=304), min_size=1, max_size=9), min_size=2, max_size=12)


def _prompts(tokenizer, n):
    texts = [f"<|im_start|>user\nI watched film {i}<|im_end|>\n<|im_start|>assistant\n" for i in range(n)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _search(model, prompts, trie, beams, seen, counts=None):
    return batched_constrained_beam_search(model, prompts, trie, beams, seen=seen, counts=counts)


@SLOW
@given(TEXTS, st.integers(min_value=1, max_value=4), st.data())
def test_forced_chains_fed_ahead_change_nothing_but_the_number_of_passes(tiny_llm, texts, beams, data):
    model, tokenizer = tiny_llm
    items = list(range(1, len(texts) + 1))
    trie = ItemTrie(texts, items)
    seen = [data.draw(st.lists(st.sampled_from(items), max_size=3)) for _ in range(3)]
    prompts = _prompts(tokenizer, 3)
    ahead, one_by_one = {}, {}
    found = _search(model, prompts, trie, beams, seen, ahead)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation, "_forced_child", lambda *args: None)  # every node waits for its own step
        expected = _search(model, prompts, trie, beams, seen, one_by_one)
    assert [[i for i, _ in user] for user in found] == [[i for i, _ in user] for user in expected]
    for user, other in zip(found, expected):
        for (_, a), (_, b) in zip(user, other):
            assert math.isclose(a, b, abs_tol=1e-5)
    assert ahead.get("steps", 0) <= one_by_one.get("steps", 0)


def test_a_long_unique_title_is_fed_in_one_pass_not_one_per_token(tiny_llm):
    model, tokenizer = tiny_llm
    texts = [[300, 301], [300, 302, 303, 304, 305, 306, 307, 308, 309]]  # the second: a chain of 7 after 302
    trie = ItemTrie(texts, [1, 2])
    ahead, one_by_one = {}, {}
    found = _search(model, _prompts(tokenizer, 1), trie, 2, None, ahead)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation, "_forced_child", lambda *args: None)
        expected = _search(model, _prompts(tokenizer, 1), trie, 2, None, one_by_one)
    assert sorted(i for i, _ in found[0]) == [1, 2]
    assert dict(found[0]) == pytest.approx(dict(expected[0]), abs=1e-5)
    assert one_by_one["steps"] == 8  # 300, then 302 ... 308: one pass a token
    assert ahead["steps"] == 2  # 300 (it branches), then 302 with its forced chain 303 ... 308 in one pass


def test_the_growing_cache_writes_in_place_and_keeps_its_columns_when_it_grows(tiny_llm):
    model, _ = tiny_llm
    cache = GrowingCache(model, capacity=3, dtype=torch.float32)  # empty: no start
    layer = cache.layers[0]
    parts = [torch.randn(2, 2, n, 8, dtype=torch.bfloat16) for n in (2, 1, 4)]
    for part in parts:
        keys, values = layer.update(part, part * 2)
    whole = torch.cat(parts, dim=2).float()
    assert keys.dtype == torch.float32 and layer.get_seq_length() == 7
    assert torch.equal(keys, whole) and torch.equal(values, whole * 2)
    assert keys.data_ptr() == layer._keys.data_ptr()  # a view of the buffer, not a copy


@pytest.mark.parametrize("n", [5, 40])  # a beam step (fp32 matmuls), a prompt pass (SDPA on packed heads)
def test_beam_attention_gives_the_models_numbers_and_is_restored(tiny_llm, n):
    model, _ = tiny_llm
    torch.manual_seed(0)
    prompt = torch.randint(300, 2000, (3, 12))
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).cache
        new = torch.randint(300, 2000, (3, n))
        allowed = torch.zeros(3, n, 12 + n, dtype=torch.bool)
        allowed[:, :, :12] = True
        allowed[:, torch.arange(n), 12 + torch.arange(n)] = True
        allowed[1, 3, 12] = True  # a node that also sees an ancestor
        mask = torch.zeros(3, 1, n, 12 + n).masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
        inputs = dict(input_ids=new, position_ids=torch.full((3, n), 12), attention_mask=mask, use_cache=True)
        plain = model(**inputs, cache=copy.deepcopy(cache)).logits
        before = model.config._attn_implementation
        with beam_attention(model) as cache_dtype:
            assert model.config._attn_implementation != before and cache_dtype == torch.float32
            packed = model(**inputs, cache=copy.deepcopy(cache)).logits
    assert model.config._attn_implementation == before
    assert torch.allclose(plain, packed, atol=1e-4)
