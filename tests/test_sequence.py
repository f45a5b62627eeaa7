"""All-position training (llm_train_objective: sequence) and the list prompt format it trains."""

import numpy as np
import pytest
import torch
from conftest import build, train_steps

from recbole_llmgen import finetune, sequence
from recbole_llmgen.trainer import LLMGenTrainer


def _list(config_dict, **extra):
    return {
        **config_dict,
        "prompt_format": "list",
        "llm_train_objective": "sequence",
        "train_mode": "lora",
        "lora_r": 4,
        "max_history_items": 4,
        "epochs": 1,
        **extra,
    }


def _targets(loader) -> dict[int, set[int]]:
    """Each user's target items of an evaluation loader (full-sort: positive_u / positive_i)."""
    found: dict[int, set[int]] = {}
    for batch in loader:
        interaction, _, positive_u, positive_i = batch
        users = interaction["user_id"]
        for u, i in zip(positive_u.tolist(), positive_i.tolist()):
            found.setdefault(int(users[u]), set()).add(int(i))
    return found


def test_list_prompt_is_the_header_then_each_items_own_tokens(toy_config_dict):
    _, model, *_ = build(_list(toy_config_dict, train_mode="none"))
    prompt = model.prompts.build([3, 1, 2])
    head = model.prompts.encode("Movies a user watched, oldest first, one per line:\n")
    assert (
        prompt
        == head + model.prompts.item_token_ids[3] + model.prompts.item_token_ids[1] + model.prompts.item_token_ids[2]
    )
    assert model.tokenizer.decode(prompt).endswith(model.item_texts[2] + "\n")  # the next item starts a line
    newline = model.tokenizer.encode("\n", add_special_tokens=False)
    assert all(ids[-1:] == newline for ids in model.prompts.item_token_ids[1:])  # an item's end is scored too
    assert not model.prompts.use_chat


def test_a_cut_item_text_keeps_its_line_break(toy_config_dict):
    _, model, *_ = build(_list(toy_config_dict, train_mode="none", max_item_text_tokens=3))
    newline = model.tokenizer.encode("\n", add_special_tokens=False)
    assert all(len(ids) <= 3 and ids[-1:] == newline for ids in model.prompts.item_token_ids[1:])


def test_training_row_and_scoring_read_the_same_log_probabilities(toy_config_dict):
    """The identity all-position training rests on: the mean log-probability of item k read off one
    packed training row equals LLMGen's likelihood score of item k after the items before it."""
    _, model, *_ = build(_list(toy_config_dict))
    model.eval()
    window = [5, 9, 2, 14, 7]  # max_history_items + 1 items
    rows, spans = model.prompts.window_rows([window])
    with torch.no_grad():
        from_row = -finetune.sequence_item_nll(model.llm, rows, spans, model.tokenizer.pad_token_id)
        for k in range(1, len(window)):
            scored = model.scorer.score([window[:k]], [[window[k], 1, 3]], [0])[0]
            assert from_row[k - 1].item() == pytest.approx(scored[0].item(), abs=1e-4), k


def test_windows_cover_every_item_once_with_the_default_stride():
    seq = list(range(1, 24))
    found = sequence.windows(seq, size=5, stride=4)
    assert all(2 <= len(w) <= 5 for w in found)
    predicted = [i for w in found for i in w[1:]]
    assert sorted(predicted) == seq[1:]  # every item but the first, exactly once
    assert sequence.windows([1], 5, 4) == [] and sequence.windows([1, 2], 5, 4) == [[1, 2]]
    overlapping = sequence.windows(seq, size=5, stride=2)
    assert set(i for w in overlapping for i in w) == set(seq) and overlapping[-1][-1] == seq[-1]


def test_windows_hold_only_training_items(toy_config_dict):
    """No validation or test item enters a training window, and every training item does."""
    config, model, train_data, valid_data, test_data = build(_list(toy_config_dict))
    sequences = sequence.training_sequences(train_data._dataset)
    valid, test = _targets(valid_data), _targets(test_data)
    assert set(sequences) == set(valid) == set(test)
    for user, items in sequences.items():
        assert not set(items) & (valid[user] | test[user])
    loader = sequence.window_loader(train_data, model, 2, 0)
    dataset = train_data._dataset
    seen = {}
    for window in loader.items:
        # windows are consecutive runs of one user's training sequence
        owners = [u for u, s in sequences.items() if any(s[i : i + len(window)] == window for i in range(len(s)))]
        assert owners, window
        seen.setdefault(owners[0], set()).update(window)
    assert seen == {u: set(s) for u, s in sequences.items()}
    # the training rows RecBole built hold the same items (history + target of every row)
    rows = dataset.inter_feat
    for user, items in sequences.items():
        mine = rows[dataset.uid_field].numpy() == user
        assert set(rows[dataset.iid_field].numpy()[mine].tolist()) == set(items[1:])


def test_batches_group_similar_lengths_and_cover_every_window_each_epoch():
    rng = np.random.default_rng(0)
    items = [list(range(1, int(n) + 1)) for n in rng.integers(2, 30, size=500)]
    lengths = [len(w) * 7 for w in items]
    loader = sequence.WindowLoader(None, items, lengths, batch_size=8, seed=3)
    first = loader.batches()
    assert sorted(i for b in first for i in b.tolist()) == list(range(500))
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in first)
    shuffled = rng.permutation(500)
    random = sum(
        max(lengths[i] for i in shuffled[s : s + 8]) * len(shuffled[s : s + 8])
        - sum(lengths[i] for i in shuffled[s : s + 8])
        for s in range(0, 500, 8)
    )
    assert padding < 0.2 * random
    loader.set_epoch(1)
    second = loader.batches()
    assert [b.tolist() for b in second] != [b.tolist() for b in first]  # reshuffled
    loader.set_epoch(0)
    assert [b.tolist() for b in loader.batches()] == [b.tolist() for b in first]  # same seed and epoch, same order
    shards = []
    for rank in range(3):
        loader.rank, loader.world = rank, 3
        shards.append(loader.batches())
    assert len({len(s) for s in shards}) == 1  # every rank makes the same number of steps
    assert {i for s in shards for b in s for i in b.tolist()} == set(range(500))


def test_one_pass_trains_every_position(toy_config_dict):
    _, model, train_data, *_ = build(_list(toy_config_dict, lora_dropout=0.0))
    loader = sequence.window_loader(train_data, model, 4, 0)
    batch = next(iter(loader))
    windows = [row[:n].tolist() for row, n in zip(batch[sequence.WINDOW_FIELD], batch[sequence.WINDOW_LEN_FIELD])]
    loss = model.calculate_loss(batch)
    rows, spans = model.prompts.window_rows(windows)
    assert sum(len(s) for s in spans) == sum(len(w) - 1 for w in windows)
    expected = finetune.sequence_item_nll(model.llm, rows, spans, model.tokenizer.pad_token_id).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    losses = train_steps(model, batch, 6)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("train_mode", ["lora", "full"])
def test_sequence_objective_under_recbole_trainer(toy_config_dict, train_mode):
    config, model, train_data, valid_data, test_data = build(
        _list(toy_config_dict, train_mode=train_mode, epochs=2, stopping_step=2, train_batch_size=4)
    )
    before = {k: p.detach().clone() for k, p in model.llm_trainable.items()}
    trainer = LLMGenTrainer(config, model)
    seen = []
    original = trainer._train_epoch
    trainer._train_epoch = lambda data, epoch, **kw: seen.append(type(data).__name__) or original(data, epoch, **kw)
    best, result = trainer.fit(train_data, valid_data, saved=True)
    assert seen == ["WindowLoader", "WindowLoader"] and result is not None
    assert any(not torch.equal(before[k], p) for k, p in model.llm_trainable.items())
    assert all(np.isfinite(v) for v in trainer.train_loss_dict.values())
    checkpoint = torch.load(trainer.saved_model_file, weights_only=False)
    assert checkpoint["state_dict"]["_extra_state"]["objective"] == "sequence"
    from conftest import hand_metrics

    result = trainer.evaluate(test_data)  # the best checkpoint, loaded: the metrics of its scores
    assert {k: round(float(result[k]), 4) for k in ("ndcg@10", "hit@10")} == hand_metrics(model, test_data)


def test_resuming_with_another_objective_is_refused(toy_config_dict):
    config, model, train_data, valid_data, _ = build(_list(toy_config_dict))
    trainer = LLMGenTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    config, model, train_data, valid_data, _ = build(
        _list(toy_config_dict, llm_train_objective="next_item", checkpoint=trainer.saved_model_file)
    )
    with pytest.raises(
        ValueError, match="model_file: saved with objective='sequence', but this model has objective='next_item'"
    ):
        LLMGenTrainer(config, model).fit(train_data, valid_data)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"llm_train_objective": "all"},
            "llm_train_objective: 'all' is not allowed; choose one of next_item, sequence",
        ),
        ({"prompt_format": "chat"}, "llm_train_objective: sequence .* set prompt_format: list"),
        ({"prompt_format": "table"}, "prompt_format: 'table' is not allowed; choose one of chat, list"),
        (
            {"list_prompt_template": "Movies: {history}. Next?"},
            "list_prompt_template: .* does not end where the next item begins",
        ),
        ({"list_prompt_template": "Movies: {history}"}, "list_prompt_template: .* must have a line break right before"),
        ({"score_method": "verbalizer"}, "prompt_format: list .* score_method: verbalizer needs prompt_format: chat"),
        ({"llm_train_window_stride": 0}, r"llm_train_window_stride: expected an integer >= 1 or ~"),
    ],
)
def test_bad_sequence_settings_are_named(toy_config_dict, extra, message):
    with pytest.raises(ValueError, match=message):
        build(_list(toy_config_dict, **extra))
