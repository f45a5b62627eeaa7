"""Constrained generation: only catalogue items, scores equal to the likelihood scorer."""

import math

import pytest
import torch
from conftest import build
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recbole_llmgen import scoring
from recbole_llmgen.generation import ItemTrie, constrained_beam_search

# token ids of real vocabulary entries, few enough that texts collide and share prefixes
TOKENS = st.integers(min_value=300, max_value=306)
CATALOGUE = st.lists(st.lists(TOKENS, min_size=1, max_size=5), min_size=1, max_size=10)
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _generating(toy_config_dict, **settings):
    """A ``score_method: generate`` LLMGen in eval mode, its first test batch and that batch's
    histories / seen items (``retriever.view``)."""
    _, model, _, _, test_data = build(dict(toy_config_dict, score_method="generate", **settings))
    model.eval()
    batch = next(iter(test_data))[0]
    return model, batch, model.retriever.view(batch)


@given(CATALOGUE)
def test_trie_maps_every_text_to_all_its_items(texts):
    items = list(range(1, len(texts) + 1))
    trie = ItemTrie(texts, items)
    for text, item in zip(texts, items):
        same = sorted(i for t, i in zip(texts, items) if t == text)
        assert item in same and trie.items_of(text) == same  # duplicates map to all, in id order
    assert trie.walk([999]) is None


def test_trie_refuses_an_empty_text():
    with pytest.raises(ValueError, match="item 3 has no tokens"):
        ItemTrie([[1], []], [1, 3])


def _prompt(tokenizer):
    text = "<|im_start|>user\nI watched Heat<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@SLOW
@given(CATALOGUE, st.integers(min_value=1, max_value=4))
def test_beams_only_reach_catalogue_items_with_likelihood_scores(tiny_llm, texts, num_beams):
    model, tokenizer = tiny_llm
    prompt = _prompt(tokenizer)
    items = list(range(1, len(texts) + 1))
    found = constrained_beam_search(model, prompt, ItemTrie(texts, items), num_beams)
    assert found and all(item in items for item, _ in found)  # 0 invalid items
    assert len({i for i, _ in found}) == len(found)
    expected = scoring.shared_prefix_scores(model, prompt, texts)
    for item, score in found:
        assert math.isclose(score, expected[item - 1].item(), abs_tol=1e-4)


@SLOW
@given(CATALOGUE)
def test_a_beam_as_wide_as_the_catalogue_ranks_it_exactly(tiny_llm, texts):
    model, tokenizer = tiny_llm
    prompt = _prompt(tokenizer)
    items = list(range(1, len(texts) + 1))
    found = constrained_beam_search(model, prompt, ItemTrie(texts, items), num_beams=len(texts))
    assert sorted(i for i, _ in found) == items  # every item reached, prefix texts included
    expected = scoring.shared_prefix_scores(model, prompt, texts)
    truth = sorted(items, key=lambda i: (-expected[i - 1].item(), i))
    got = [i for i, _ in found]
    # identical order up to float ties
    for a, b in zip(got, truth):
        assert a == b or abs(expected[a - 1] - expected[b - 1]) < 1e-4


def test_unicode_and_long_titles_tokenised_like_the_scorer(tiny_llm):
    model, tokenizer = tiny_llm
    titles = ["Amélie (2001)", "東京物語 (1953)", "Amélie", "A " * 40 + "(1999)", "Zoë's Ünicode 🎬"]
    texts = [tokenizer(t, add_special_tokens=False)["input_ids"][:12] for t in titles]  # long one cut
    items = list(range(1, len(texts) + 1))
    found = dict(constrained_beam_search(model, _prompt(tokenizer), ItemTrie(texts, items), num_beams=len(items)))
    expected = scoring.shared_prefix_scores(model, _prompt(tokenizer), texts)
    assert set(found) == set(items)
    for item in items:
        assert math.isclose(found[item], expected[item - 1].item(), abs_tol=1e-4)


def test_generate_full_sort_predict(toy_config_dict):
    config = dict(toy_config_dict, score_method="generate", num_beams=40)  # wider than the catalogue
    _, model, _, _, test_data = build(config)
    batch = next(iter(test_data))[0]
    scores = model.full_sort_predict(batch)
    assert scores.shape == (len(batch), model.n_items)
    for row in range(len(batch)):
        history = batch[model.ITEM_SEQ][row, : batch[model.ITEM_SEQ_LEN][row]].tolist()
        unseen = [i for i in range(1, model.n_items) if i not in history]
        # every unseen item reached, at its likelihood score
        likelihood = model.scorer.score([history], [unseen])[0]
        assert torch.allclose(scores[row, unseen], likelihood, atol=1e-4)
        assert all(scores[row, i] == -math.inf for i in history)
    # predict (sampled protocols) gives the same numbers
    from recbole.data.interaction import Interaction

    items = torch.tensor([1, 2, 3])
    inter = Interaction(
        {
            model.USER_ID: batch[model.USER_ID][:1].repeat(3),
            model.ITEM_SEQ: batch[model.ITEM_SEQ][:1].repeat(3, 1),
            model.ITEM_SEQ_LEN: batch[model.ITEM_SEQ_LEN][:1].repeat(3),
            model.ITEM_ID: items,
        }
    )
    predicted = model.predict(inter)
    history = batch[model.ITEM_SEQ][0, : batch[model.ITEM_SEQ_LEN][0]].tolist()
    for k, item in enumerate(items.tolist()):
        if item not in history:
            assert math.isclose(predicted[k].item(), scores[0, item].item(), abs_tol=1e-4)


@pytest.mark.parametrize(
    ("configured", "penalty"), [(0.0, 0.0), (0.5, 0.5), ("auto", 0.0), ("auto", 0.5), (1.0, 0.5), ("auto", 1.0)]
)
def test_length_penalty_scores_likelihood_and_generation_alike(toy_config_dict, configured, penalty):
    """An item's score is its summed token log-probability / tokens ** length_penalty, in the
    likelihood scorer and in the generated ranking (beams as wide as the catalogue: every item),
    whether the value is configured, chosen (``auto``) or set on a model configured with the mean."""
    config = dict(toy_config_dict, score_method="generate", num_beams=40, length_penalty=configured)
    _, model, _, _, test_data = build(config)
    if configured != penalty:
        model.length_penalty = penalty
    batch = next(iter(test_data))[0]
    scores = model.full_sort_predict(batch)
    history = batch[model.ITEM_SEQ][0, : batch[model.ITEM_SEQ_LEN][0]].tolist()
    unseen = [i for i in range(1, model.n_items) if i not in history]
    prompts, tokens = model.prompts, model.prompts.item_token_ids
    summed = scoring.score_continuations(
        model.llm, [prompts.build(history, unseen)], [[tokens[i] for i in unseen]], normalization="sum"
    )[0]
    expected = summed / torch.tensor([float(len(tokens[i])) for i in unseen]) ** penalty
    assert torch.allclose(model.scorer.score([history], [unseen])[0], expected, atol=1e-4)
    assert torch.allclose(scores[0, unseen], expected, atol=1e-4)
    assert len({len(tokens[i]) for i in unseen}) > 1  # texts of several lengths: the penalty matters


def test_narrow_beams_rank_reached_items_above_the_rest(toy_config_dict):
    _, model, _, _, test_data = build(dict(toy_config_dict, score_method="generate", num_beams=2))
    batch = next(iter(test_data))[0]
    scores = model.full_sort_predict(batch)
    retrieval = model.retriever.scores(batch)
    for row in range(len(batch)):
        history = batch[model.ITEM_SEQ][row, : batch[model.ITEM_SEQ_LEN][row]].tolist()
        reached = {i for i, _ in model.generator.items([history])[0]}
        assert reached and all(0 < i < model.n_items for i in reached)
        others = [i for i in range(1, model.n_items) if i not in reached and i not in history]
        assert max(scores[row, others]) < min(scores[row, list(reached)])
        by_score = sorted(others, key=lambda i: -scores[row, i].item())
        assert by_score == sorted(others, key=lambda i: (-retrieval[row, i].item(), i))


def test_free_generation_is_grounded_to_the_catalogue(toy_config_dict, monkeypatch):
    _, model, _, _, test_data = build(
        dict(toy_config_dict, score_method="generate", generation_constraint="none", num_beams=3)
    )
    batch = next(iter(test_data))[0]
    history = batch[model.ITEM_SEQ][0, : batch[model.ITEM_SEQ_LEN][0]].tolist()
    target = next(i for i in range(1, model.n_items) if i not in history)
    generations = model.generator.free_text(history)
    assert len(generations) == 3 and all(isinstance(g, str) for g in generations)
    # an exact catalogue text is grounded to that item, and counted
    monkeypatch.setattr(model.generator, "free_text", lambda h: [model.item_texts[target], "something else entirely"])
    for _ in range(2):  # the counts are the last evaluation's, not running totals
        scores = model.full_sort_predict(batch)
        assert model.generator.stats == {"exact": len(batch), "generations": 2 * len(batch)}
    assert scores.shape == (len(batch), model.n_items)
    assert int(scores[0].argmax()) == target
    assert all(scores[0, i] == -math.inf for i in history)


def test_unknown_generation_constraint(toy_config_dict):
    with pytest.raises(ValueError, match=r"generation_constraint: 'regex' is not allowed; choose one of trie, none"):
        build(dict(toy_config_dict, generation_constraint="regex"))


def test_item_tokens_are_the_tokens_they_get_after_the_prompt(tokenizer):
    """The trie and the scorer use item tokens as tokenized alone; after the chat template's
    assistant header they must be exactly what the whole prompt + text tokenizes to."""
    import os

    import recbole

    path = os.path.join(os.path.dirname(recbole.__file__), "dataset_example", "ml-100k", "ml-100k.item")
    with open(path, encoding="utf-8", errors="replace") as f:
        rows = [line.rstrip("\n").split("\t") for line in f.readlines()[1:]]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for row in rows:
        text = f"{row[1]} ({row[2]})" if row[2] else row[1]
        alone = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer(prompt + text, add_special_tokens=False)["input_ids"] == prompt_ids + alone, text


@SLOW
@given(CATALOGUE, st.integers(min_value=1, max_value=4))
def test_batched_users_equal_one_user_at_a_time(tiny_llm, texts, num_beams):
    from recbole_llmgen.generation import batched_constrained_beam_search

    model, tokenizer = tiny_llm
    prompts = [
        tokenizer(f"<|im_start|>user\n{h}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        for h in ("Heat", "A much longer history: Alien, Aliens, Heat, Ronin", "Up")
    ]
    items = list(range(1, len(texts) + 1))
    trie = ItemTrie(texts, items)
    batched = batched_constrained_beam_search(model, prompts, trie, num_beams, tokenizer.pad_token_id)
    for prompt, got in zip(prompts, batched):
        alone = constrained_beam_search(model, prompt, trie, num_beams)  # no padding, no other users
        assert [i for i, _ in got] == [i for i, _ in alone]
        # every score is the item's mean log-probability from an independent full forward pass
        reference = scoring.naive_scores(model, prompt, [texts[i - 1] for i, _ in got])
        for (item, score), expected in zip(got, reference.tolist()):
            assert math.isclose(score, expected, abs_tol=1e-4), item


@SLOW
@given(CATALOGUE, st.integers(min_value=1, max_value=4), st.data())
def test_no_beam_is_spent_on_a_seen_item(tiny_llm, texts, num_beams, data):
    model, tokenizer = tiny_llm
    prompt = _prompt(tokenizer)
    items = list(range(1, len(texts) + 1))
    seen = set(data.draw(st.lists(st.sampled_from(items), max_size=len(items))))
    trie = ItemTrie(texts, items)
    found = constrained_beam_search(model, prompt, trie, num_beams, seen=seen)
    assert not {i for i, _ in found} & seen  # 0 seen items
    expected = scoring.shared_prefix_scores(model, prompt, texts)
    for item, score in found:
        assert math.isclose(score, expected[item - 1].item(), abs_tol=1e-4)
    unseen = [i for i in items if i not in seen]
    wide = constrained_beam_search(model, prompt, trie, num_beams=len(items), seen=seen)
    assert sorted(i for i, _ in wide) == unseen  # every unseen item, none seen: the exact ranking of the rest
    if unseen:
        # a seen node is never entered: the beams' budget goes to unseen items only
        assert len(found) >= min(num_beams, len({tuple(texts[i - 1]) for i in unseen})) or len(found) >= 1


def test_generation_never_recommends_a_training_item_beyond_the_sequence_window(toy_config_dict):
    model, batch, view = _generating(toy_config_dict, num_beams=4, MAX_ITEM_LIST_LENGTH=3)
    assert any(len(set(seen)) > len(history) for seen, history in zip(view.seen, view.histories))
    found = model.generator.items(view.histories, seen=view.seen)
    for pairs, seen in zip(found, view.seen):
        assert pairs and not {i for i, _ in pairs} & set(seen)  # 0 seen, 0 invalid
        assert all(0 < i < model.n_items for i, _ in pairs)
    scores = model.full_sort_predict(batch)
    for row, seen in enumerate(view.seen):
        assert all(scores[row, i] == -math.inf for i in seen)
        top = torch.topk(scores[row], len(found[row])).indices.tolist()
        assert set(top) == {i for i, _ in found[row]}  # the generated items lead the ranking


def test_candidate_source_none_ranks_the_catalogue_from_the_llm_alone(toy_config_dict):
    model, batch, view = _generating(toy_config_dict, candidate_source="none", num_beams=3)
    scores = model.full_sort_predict(batch).cpu()
    counts = model.retriever.item_counts
    for row, (seen, pairs) in enumerate(zip(view.seen, model.generator.items(view.histories, seen=view.seen))):
        generated = [i for i, _ in pairs]
        rest = [i for i in range(1, model.n_items) if i not in seen and i not in generated]
        ranked = sorted(range(1, model.n_items), key=lambda i: -scores[row, i].item())
        assert ranked[: len(generated)] == generated  # the LLM's items in beam-score order
        below = [i for i in ranked if i in rest]
        assert below == sorted(rest, key=lambda i: (-int(counts[i]), i))  # then training popularity, stated
        assert all(scores[row, i] == -math.inf for i in seen)


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_generated_items_fuse_with_the_candidate_models_score(toy_config_dict, weight):
    model, batch, view = _generating(toy_config_dict, num_beams=4, score_fusion=weight)
    scores = model.full_sort_predict(batch).cpu()
    counts = model.retriever.item_counts
    for row, pairs in enumerate(model.generator.items(view.histories, seen=view.seen)):
        generated = {i for i, _ in pairs}
        order = [i for i in sorted(range(1, model.n_items), key=lambda i: -scores[row, i].item()) if i in generated]
        if weight == 0.0:  # the candidate model's (popularity's) order of the generated items
            assert [int(counts[i]) for i in order] == sorted((int(counts[i]) for i in order), reverse=True)
        else:  # the beams' order
            assert order == [i for i, _ in pairs]


def test_the_fusion_grid_generates_for_each_valid_user_once(toy_config_dict):
    from recbole_llmgen.trainer import LLMGenTrainer

    config, model, train_data, valid_data, _ = build(dict(toy_config_dict, score_method="generate", num_beams=3,
                                                          score_fusion="auto"))  # fmt: skip
    users = sum(len(batch[0]) for batch in valid_data)
    LLMGenTrainer(config, model).fit(train_data, valid_data, saved=False)
    assert model.generator.searched_users == users and model.fusion_weight is not None


def test_users_are_batched_by_prompt_length_and_the_buffers_kept_within_a_session(toy_config_dict):
    model, _, view = _generating(toy_config_dict, num_beams=4, generation_users_per_batch=2)
    # prompts of several lengths, not in order: the batches reorder them
    histories = [history[-keep:] for history, keep in zip(view.histories, (6, 2, 9, 1, 4))]
    seen = view.seen[:5]
    generator = model.generator
    alone = generator.items(histories, seen=seen)
    assert generator._pool == {}  # no session open: a call lets its buffers go when it returns
    with generator.session():  # an evaluation's batches: kept from one call to the next
        _session_calls(generator, histories, seen, alone)
    assert generator._pool == {}  # the session ended: let go
    with generator.session():
        generator.items(histories, seen=seen)
        model.train()  # the weights will change: the buffers go
        assert generator._pool == {}


def _session_calls(generator, histories, seen, alone):
    together = generator.items(histories, seen=seen)
    assert together == alone
    buffers = {key: held.data_ptr() for key, held in generator._pool.items()}
    assert buffers  # the packed search's cache, queries and logits
    assert generator.items(histories, seen=seen) == together
    assert {key: held.data_ptr() for key, held in generator._pool.items()} == buffers  # the same memory again
    for history, blocked, pairs in zip(histories, seen, together):  # each user's own results, in the caller's order
        alone = generator.items([history], seen=[blocked])[0]
        assert [i for i, _ in pairs] == [i for i, _ in alone]
        assert dict(pairs) == pytest.approx(dict(alone), abs=1e-4)
