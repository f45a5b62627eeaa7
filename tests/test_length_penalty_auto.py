"""``length_penalty: auto``: the valid split chooses how item likelihoods are length-normalised,
one LLM pass per user serves every value, the choice is saved and reloaded."""

import pytest
import torch
from conftest import build, record_evaluations

from recbole_llmgen.settings import LENGTH_PENALTY_GRID
from recbole_llmgen.trainer import LLMGenTrainer


def _users(loader) -> int:
    return sum(len(batch[0]) for batch in loader)


def test_auto_chooses_on_valid_scores_each_user_once_saves_and_reloads(toy_config_dict):
    from recbole.quick_start import load_data_and_model

    config, model, train_data, valid_data, test_data = build({**toy_config_dict, "length_penalty": "auto"})
    trainer = LLMGenTrainer(config, model)
    evaluated = record_evaluations(trainer, lambda: model.length_penalty)
    trainer.fit(train_data, valid_data, saved=True)
    assert sorted({p for data, p in evaluated}) == sorted(LENGTH_PENALTY_GRID)
    assert all(data is valid_data for data, _ in evaluated)  # the grid never sees the test split
    assert model.scorer.scored_users == _users(valid_data)  # 5 values, each valid user through the LLM once
    chosen = model.length_penalty
    assert trainer.length_penalties == [chosen]
    scores = {p: float(r["ndcg@10"]) for p, r in trainer.length_penalty_history[-1].items()}
    assert scores[chosen] == max(scores.values()) and chosen == max(p for p in scores if scores[p] == scores[chosen])
    assert len(set(scores.values())) > 1  # the values rank differently here: the choice is a real one
    test = trainer.evaluate(test_data)
    checkpoint = torch.load(trainer.saved_model_file, weights_only=False)
    assert checkpoint["other_parameter"]["length_penalty"] == chosen
    config_again, reloaded, _, _, _, test_again = load_data_and_model(trainer.saved_model_file)
    assert reloaded.length_penalty == chosen
    assert dict(LLMGenTrainer(config_again, reloaded).evaluate(test_again, load_best_model=False)) == dict(test)


@pytest.mark.parametrize("penalty", [0.0, 0.5])
def test_a_value_chosen_by_auto_ranks_as_the_value_configured(toy_config_dict, penalty):
    """The valid results auto recorded for a value equal a run configured with that value."""
    config, model, train_data, valid_data, _ = build({**toy_config_dict, "length_penalty": "auto"})
    trainer = LLMGenTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=False)
    config_fixed, fixed, train_fixed, valid_fixed, _ = build({**toy_config_dict, "length_penalty": penalty})
    fixed_trainer = LLMGenTrainer(config_fixed, fixed)
    fixed_trainer.fit(train_fixed, valid_fixed, saved=False)
    assert dict(trainer.length_penalty_history[-1][penalty]) == dict(fixed_trainer.best_valid_result)


def test_auto_with_fusion_chooses_the_pair_and_generation_searches_once(toy_config_dict):
    config, model, train_data, valid_data, _ = build(
        {
            **toy_config_dict,
            "length_penalty": "auto",
            "score_fusion": "auto",
            "score_method": "generate",
            "num_beams": 6,
        }
    )
    trainer = LLMGenTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=False)
    assert model.generator.searched_users == _users(valid_data)  # 5 x 11 pairs, one search per user
    assert len(trainer.fusion_history) == len(trainer.length_penalty_history) == 1  # one record per validation
    fused = trainer.fusion_history[-1]
    lengths = trainer.length_penalty_history[-1]
    assert set(fused) == {round(0.1 * i, 1) for i in range(11)} and set(lengths) == set(LENGTH_PENALTY_GRID)
    assert fused[model.fusion_weight] == lengths[model.length_penalty]  # the same (penalty, weight) evaluation
    best = float(fused[model.fusion_weight]["ndcg@10"])
    assert best >= max(float(r["ndcg@10"]) for r in (*fused.values(), *lengths.values()))


def test_auto_without_validation_is_named(toy_config_dict):
    _, model, _, _, test_data = build({**toy_config_dict, "length_penalty": "auto"})
    with pytest.raises(
        ValueError, match="length_penalty: auto chooses its value on the valid split, and no validation"
    ):
        model.eval().full_sort_predict(next(iter(test_data))[0])


def test_auto_with_the_verbalizer_is_named(toy_config_dict):
    with pytest.raises(ValueError, match="length_penalty: auto .* score_method: verbalizer scores one label token"):
        build({**toy_config_dict, "length_penalty": "auto", "score_method": "verbalizer"})
