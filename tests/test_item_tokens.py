"""item_id_format: token: one new token per item, the whole catalogue ranked by one forward pass."""

import pytest
import torch
import torch.nn.functional as F
from conftest import build, hand_metrics

from recbole_llmgen.trainer import LLMGenTrainer


def _tokens(config_dict, **extra):
    return {
        **config_dict,
        "item_id_format": "token",
        "prompt_format": "list",
        "llm_train_objective": "sequence",
        "train_mode": "lora",
        "lora_r": 4,
        "max_history_items": 4,
        "epochs": 2,
        "learning_rate": 0.01,
        **extra,
    }


def _by_hand(model, history: list[int]) -> torch.Tensor:
    """The catalogue's log-softmax after ``history``: header tokens, then the items' input rows,
    through the decoder, the last state times the output rows (padding -inf)."""
    llm, rows = model.llm, model.item_tokens
    head = torch.tensor(model.prompts.list_head)
    inputs = torch.cat([llm.get_input_embeddings()(head), rows.input_rows[torch.tensor(history)].to(llm.dtype)])
    hidden = llm.get_decoder()(inputs_embeds=inputs[None]).last_hidden_state[0, -1]
    logits = hidden.float() @ rows.output_rows.float().T
    logits[0] = -torch.inf
    return torch.log_softmax(logits, -1)


def test_item_rows_start_from_the_items_text(toy_config_dict):
    _, model, *_ = build(_tokens(toy_config_dict, train_mode="none"))
    embedding = model.llm.get_input_embeddings().weight
    head = model.llm.get_output_embeddings().weight
    for item in (1, 7, 30):
        tokens = torch.tensor(model.prompts.item_token_ids[item])
        assert torch.allclose(model.item_tokens.input_rows[item], embedding[tokens].float().mean(0))
        assert torch.allclose(model.item_tokens.output_rows[item], head[tokens].float().mean(0))
    assert not model.item_tokens.input_rows[0].any()  # padding
    assert not any(p.requires_grad for p in model.parameters())  # zero-shot: nothing to train, nothing counted


def test_one_pass_ranks_every_unseen_item_exactly_as_by_hand(toy_config_dict):
    """full_sort_predict: a finite score for every item the user has not seen (a full ranking, no
    candidates, no beams: candidate_source none), equal to the computation by hand; its metrics are
    those scores'."""
    config, model, _, _, test_data = build(_tokens(toy_config_dict, train_mode="none", candidate_source="none"))
    model.eval()
    interaction, _, _, _ = next(iter(test_data))
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
    view = model.retriever.view(interaction)
    for b in range(len(interaction)):
        seen = set(view.seen[b])
        finite = torch.isfinite(scores[b])
        assert set(torch.nonzero(finite).view(-1).tolist()) == set(range(1, model.n_items)) - seen
        with torch.no_grad():
            expected = _by_hand(model, [i for i in view.histories[b] if i][-4:])
        assert torch.allclose(scores[b][finite], expected[finite], atol=1e-4)
    trainer = LLMGenTrainer(config, model)
    result = trainer.evaluate(test_data, load_best_model=False)
    assert {k: result[k] for k in ("ndcg@10", "hit@10")} == hand_metrics(model, test_data)


def test_sequence_loss_is_the_catalogue_cross_entropy_at_every_position(toy_config_dict):
    _, model, *_ = build(_tokens(toy_config_dict))
    model.eval()
    window = [3, 9, 4, 12]
    with torch.no_grad():
        losses = model.item_tokens.sequence_loss(model.llm, model.prompts.list_head, [window])
        expected = [-_by_hand(model, window[:t])[window[t]] for t in range(1, len(window))]
    assert torch.allclose(losses, torch.stack(expected), atol=1e-4)


def test_training_moves_the_item_rows_and_a_checkpoint_reloads_the_same_ranking(toy_config_dict, tmp_path):
    from recbole.quick_start import load_data_and_model

    config, model, train_data, valid_data, test_data = build(
        _tokens(toy_config_dict, checkpoint_dir=str(tmp_path / "saved"))
    )
    before = model.item_tokens.input_rows.detach().clone()
    trainer = LLMGenTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    losses = list(trainer.train_loss_dict.values())
    assert len(losses) == 2 and losses[1] < losses[0]  # it learns
    assert not torch.equal(before, model.item_tokens.input_rows.detach())
    saved = torch.load(trainer.saved_model_file, weights_only=False)["state_dict"]
    assert {"item_tokens.input_rows", "item_tokens.output_rows"} <= set(saved)
    tested = trainer.evaluate(test_data, load_best_model=True)
    _, loaded, _, _, _, loaded_test = load_data_and_model(trainer.saved_model_file)
    assert {k: tested[k] for k in ("ndcg@10", "hit@10")} == hand_metrics(loaded, loaded_test)

    _, titles, *_ = build({**_tokens(toy_config_dict), "item_id_format": "title"})
    with pytest.raises(ValueError, match="item_id_format='token', but this model has item_id_format='title'"):
        titles.load_state_dict(saved)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"item_id_format": "semantic"}, "item_id_format: 'semantic' is not allowed; choose one of title, token"),
        ({"prompt_format": "chat", "llm_train_objective": "next_item"}, "item_id_format: token .* prompt_format: list"),
        ({"score_fusion": "auto"}, "item_id_format: token with score_fusion is not built yet"),
    ],
)
def test_settings_errors_name_the_key(toy_config_dict, extra, message):
    with pytest.raises(ValueError, match=message):
        build(_tokens(toy_config_dict, **extra))


def test_next_item_objective_is_the_targets_cross_entropy(toy_config_dict):
    _, model, train_data, *_ = build(_tokens(toy_config_dict, llm_train_objective="next_item"))
    model.eval()
    batch = next(iter(train_data))
    batch = batch[0] if isinstance(batch, tuple) else batch
    batch = batch[torch.arange(3)]
    with torch.no_grad():
        loss = model.calculate_loss(batch)
        view = model.retriever.view(batch)
        expected = [
            F.nll_loss(_by_hand(model, [i for i in h if i][-4:])[None], torch.tensor([int(t)]))
            for h, t in zip(view.histories, batch[model.ITEM_ID])
        ]
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-4)


def test_a_token_row_says_what_it_did():
    from recbole_llmgen.benchmark.table import row_label

    row = {"model": "LLMGen", "item_id_format": "token", "candidate_source": "none", "score_method": "likelihood",
           "num_candidates": 10, "trainable_parameters": 5}  # fmt: skip
    assert row_label(row) == "LLMGen (fine-tuned; one token per item, ranks the whole catalogue)"
