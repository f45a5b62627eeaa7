import math

import pytest
import torch
from conftest import build, write_toy_dataset


def _first_batch(loader):
    return next(iter(loader))[0]


def test_no_trainable_parameters_and_empty_state(toy_config_dict):
    _, model, *_ = build(toy_config_dict)
    assert list(model.parameters()) == []
    assert list(model.state_dict()) == ["_extra_state"]  # the identity card only
    assert "frozen parameters" in str(model) and "Trainable parameters: 0" in str(model)


def test_item_texts_from_fields(toy_config_dict):
    _, model, train_data, *_ = build(toy_config_dict)
    dataset = train_data._dataset
    i3 = dataset.token2id("item_id", "i3")
    assert model.item_texts[i3] == "Movie D3 Story (1983)"
    custom = dict(toy_config_dict, item_text_fields=["title"], item_text_template="{title}!")
    _, model2, *_ = build(custom)
    assert model2.item_texts[i3] == "Movie D3 Story!"


def test_target_never_in_prompt(toy_config_dict, tokenizer):
    _, model, _, _, test_data = build(toy_config_dict)
    batch = _first_batch(test_data)
    for row in range(len(batch)):
        history = batch[model.ITEM_SEQ][row, : batch[model.ITEM_SEQ_LEN][row]].tolist()
        target = int(batch[model.ITEM_ID][row])
        prompt = tokenizer.decode(model.prompts.build(history))
        assert model.item_texts[target] not in prompt
        # the most recent history items are in the prompt, oldest first, most recent last
        recent = [model.item_texts[i] for i in history[-model.settings.max_history_items :]]
        positions = [prompt.index(t) for t in recent]
        assert positions == sorted(positions)


def test_full_sort_predict_ranks_candidates_first(toy_config_dict):
    _, model, _, _, test_data = build(toy_config_dict)
    batch = _first_batch(test_data)
    scores = model.full_sort_predict(batch)
    assert scores.shape == (len(batch), model.n_items)
    retrieval = model.retriever.scores(batch)
    from recbole_llmgen.candidates import top_candidates

    candidates = top_candidates(retrieval, model.settings.num_candidates)
    for row in range(len(batch)):
        cand = set(candidates[row].tolist())
        others = [i for i in range(1, model.n_items) if i not in cand and math.isfinite(retrieval[row, i])]
        lowest_candidate = min(scores[row, i] for i in cand)
        assert all(scores[row, i] < lowest_candidate for i in others)
        # non-candidates keep the retriever's order
        by_score = sorted(others, key=lambda i: -scores[row, i].item())
        by_retrieval = sorted(others, key=lambda i: (-retrieval[row, i].item(), i))
        assert by_score == by_retrieval
        # history items are never recommended
        history = batch[model.ITEM_SEQ][row, : batch[model.ITEM_SEQ_LEN][row]].tolist()
        assert all(scores[row, i] == -math.inf for i in history)


@pytest.mark.parametrize("score_method", ["likelihood", "verbalizer"])
def test_predict_agrees_with_full_sort_predict(toy_config_dict, score_method):
    config = dict(toy_config_dict, score_method=score_method, verbalizer_permutations=2)
    _, model, _, _, test_data = build(config)
    batch = _first_batch(test_data)
    full = model.full_sort_predict(batch)
    retrieval = model.retriever.scores(batch)
    from recbole.data.interaction import Interaction

    from recbole_llmgen.candidates import top_candidates

    candidates = top_candidates(retrieval, model.settings.num_candidates)
    rows = {key: [] for key in (model.USER_ID, model.ITEM_SEQ, model.ITEM_SEQ_LEN, model.ITEM_ID)}
    for row in range(len(batch)):
        for item in reversed(candidates[row].tolist()):  # another row order than full sort
            rows[model.USER_ID].append(batch[model.USER_ID][row])
            rows[model.ITEM_SEQ].append(batch[model.ITEM_SEQ][row])
            rows[model.ITEM_SEQ_LEN].append(batch[model.ITEM_SEQ_LEN][row])
            rows[model.ITEM_ID].append(torch.tensor(item))
    inter = Interaction({k: torch.stack(v) for k, v in rows.items()})
    predicted = model.predict(inter)
    expected = torch.stack(
        [full[r // model.settings.num_candidates, inter[model.ITEM_ID][r]] for r in range(len(inter))]
    )
    assert torch.allclose(predicted, expected, atol=1e-4)


@pytest.mark.parametrize("score_method", ["likelihood", "verbalizer"])
def test_users_sharing_a_pass_score_as_one_user_at_a_time(toy_config_dict, score_method):
    config = dict(toy_config_dict, score_method=score_method, verbalizer_permutations=2)
    _, one, _, _, test_data = build(dict(config, llm_score_batch_tokens=1))  # a row per candidate, alone
    _, many, *_ = build(dict(config, llm_score_batch_tokens=100_000))  # every user in one pass
    batch = _first_batch(test_data)
    assert torch.allclose(one.full_sort_predict(batch), many.full_sort_predict(batch), atol=1e-5)
    histories = [batch[one.ITEM_SEQ][r, : batch[one.ITEM_SEQ_LEN][r]].tolist() for r in range(len(batch))]
    lists = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]][: len(histories)]
    keys = batch[one.USER_ID].tolist()[: len(lists)]
    batched = many.scorer.score(histories[: len(lists)], lists, keys)
    for history, items, key, got in zip(histories, lists, keys, batched):
        assert torch.allclose(got, one.scorer.score([history], [items], [key])[0], atol=1e-5)


def test_the_old_batch_size_key_is_named(toy_config_dict):
    with pytest.raises(ValueError, match="llm_score_batch_size: replaced by llm_score_batch_tokens"):
        build(dict(toy_config_dict, llm_score_batch_size=64))


def test_text_candidates(toy_config_dict):
    _, model, _, _, test_data = build(dict(toy_config_dict, candidate_source="text"))
    batch = _first_batch(test_data)
    retrieval = model.retriever.scores(batch)
    assert retrieval.shape == (len(batch), model.n_items)
    finite = retrieval[torch.isfinite(retrieval)]
    assert finite.max() <= 1.0 + 1e-5 and finite.min() >= -1.0 - 1e-5  # cosine similarities
    # different users get different candidates (unlike pop)
    from recbole_llmgen.candidates import top_candidates

    tops = {tuple(r) for r in top_candidates(retrieval, 5).tolist()}
    assert len(tops) > 1


def test_popularity_prior_adds_log_count(toy_config_dict):
    _, plain, _, _, test_data = build(toy_config_dict)
    _, prior, *_ = build(dict(toy_config_dict, popularity_prior=0.5))
    batch = _first_batch(test_data)
    history = batch[plain.ITEM_SEQ][0, : batch[plain.ITEM_SEQ_LEN][0]].tolist()
    items = [1, 2, 3]
    delta = prior.scorer.score([history], [items])[0] - plain.scorer.score([history], [items])[0]
    assert torch.allclose(delta, 0.5 * torch.log1p(plain.retriever.item_counts[items].float()), atol=1e-5)


def test_popularity_prior_adds_log_count_to_generated_items_and_reorders_them(toy_config_dict):
    generate = dict(toy_config_dict, score_method="generate", num_beams=6)
    _, plain, _, _, test_data = build(generate)
    _, prior, *_ = build(dict(generate, popularity_prior=0.5))
    batch = _first_batch(test_data)
    history = batch[plain.ITEM_SEQ][0, : batch[plain.ITEM_SEQ_LEN][0]].tolist()
    counts = plain.retriever.item_counts.float()
    expected = sorted(((i, v + 0.5 * math.log1p(counts[i].item())) for i, v in plain.generator.items([history])[0]),
                      key=lambda kv: (-kv[1], kv[0]))  # fmt: skip
    found = prior.generator.items([history])[0]
    assert [i for i, _ in found] == [i for i, _ in expected]
    assert all(math.isclose(v, w, abs_tol=1e-5) for (_, v), (_, w) in zip(found, expected))


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "key,value,message",
    [
        ("score_method", "rank", r"score_method: 'rank' is not allowed; choose one of likelihood, verbalizer"),
        (
            "candidate_source",
            "random",
            r"candidate_source: .random. is not allowed; choose pop, text, none, a saved RecBole model file",
        ),
        ("train_mode", "qlora", r"train_mode: 'qlora' is not allowed; choose one of none"),
        ("num_candidates", 0, r"num_candidates: expected an integer >= 1, got 0"),
        ("num_candidates", 31, r"num_candidates: 31 exceeds the number of items in the dataset \(30\)"),
        ("prompt_template", "no placeholder", r"prompt_template: must contain '\{history\}'"),
        ("llm_dtype", "int3", r"llm_dtype: 'int3' is not allowed"),
        ("llm_score_batch_tokens", 0, r"llm_score_batch_tokens: expected an integer >= 1, got 0"),
        (
            "length_penalty",
            -0.5,
            r"length_penalty: expected a number in \[0, 2\] .*1 the mean, 0 the sum\) or auto .*got -0.5",
        ),
        ("length_penalty", "mean", r"length_penalty: expected a number in \[0, 2\]"),
    ],
)
def test_bad_values_are_named(toy_config_dict, key, value, message):
    with pytest.raises(ValueError, match=message):
        build(dict(toy_config_dict, **{key: value}))


def test_missing_text_field_lists_fields(toy_config_dict):
    with pytest.raises(ValueError, match=r"item_text_fields: \['genre'\] not found.*\['title', 'year'\]"):
        build(dict(toy_config_dict, item_text_fields=["genre"]))


def test_text_field_left_out_by_users_load_col(toy_config_dict):
    config = dict(toy_config_dict, load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "year"]})
    with pytest.raises(ValueError, match=r"\['title'\] not found.*not loaded: add them to load_col"):
        build(config)


def test_missing_llm_path_says_so(toy_config_dict, tmp_path):
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(FileNotFoundError, match=r"llm_path: .*does not exist"):
        build(dict(toy_config_dict, llm_path=missing))


def test_hub_id_offline_without_cache_says_so(toy_config_dict, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"llm_path: 'someone/not-cached-model'.*offline"):
        build(dict(toy_config_dict, llm_path="someone/not-cached-model"))


def test_empty_item_texts_fall_back_to_placeholder(tmp_path, toy_config_dict):
    titles = [f"Film {i}" for i in range(30)]
    root = write_toy_dataset(tmp_path / "empty_titles", "toy", titles)
    # blank out the titles (and years) of two items
    item_file = root / "toy" / "toy.item"
    lines = item_file.read_text().splitlines()
    lines[1] = "i0\t\t"
    lines[2] = "i1\t\t"
    item_file.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="2 item"):
        _, model, train_data, *_ = build(dict(toy_config_dict, data_path=str(root)))
    assert model.item_texts[train_data._dataset.token2id("item_id", "i0")] == "Item i0"


def test_prompt_overflow_drops_oldest_items(toy_config_dict):
    _, model, _, _, test_data = build(dict(toy_config_dict, llm_max_length=120))
    batch = _first_batch(test_data)
    history = batch[model.ITEM_SEQ][0, : batch[model.ITEM_SEQ_LEN][0]].tolist()
    with pytest.warns(UserWarning, match="dropping the oldest history items"):
        ids = model.prompts.build(history, [1, 2])
    assert len(ids) + max(len(model.prompts.item_token_ids[i]) for i in (1, 2)) <= 120
    text = model.tokenizer.decode(ids)
    assert model.item_texts[history[-1]] in text  # the most recent item is kept
    assert model.item_texts[history[-model.settings.max_history_items]] not in text


def test_a_path_looking_llm_path_that_does_not_exist_is_a_named_error(tmp_path, monkeypatch):
    """A mistyped local path is never sent to the hub: ``models/smol`` when ``models/`` is a folder
    here, a backslash, or more than one slash; ``org/name`` with no such folder stays a hub id."""
    from recbole_llmgen.llm import looks_like_path, resolve_llm_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for path in ("models/smol", "models\\smol", "a/b/c", "./smol", "smol.gguf"):
        assert looks_like_path(path), path
        with pytest.raises(FileNotFoundError, match=r"llm_path: .* does not exist on this machine"):
            resolve_llm_path(path)
    assert not looks_like_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    source = resolve_llm_path("HuggingFaceTB/SmolLM2-135M-Instruct")  # online: a hub id, nothing fetched yet
    assert source.is_hub_id
