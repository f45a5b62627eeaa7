"""Score fusion: the LLM's and the candidate model's scores combined per user, weight chosen on valid."""

import math

import pytest
import torch
from conftest import build, record_evaluations
from test_two_stage import _bpr_file, _sasrec_file

from recbole_llmgen import candidates as cand
from recbole_llmgen.trainer import LLMGenTrainer


def _batch(loader):
    batch = next(iter(loader))
    return batch[0] if isinstance(batch, tuple) else batch


def _monotone(reference: torch.Tensor, scores: torch.Tensor) -> None:
    """Wherever ``reference`` orders two finite items strictly, ``scores`` orders them the same way."""
    finite = torch.isfinite(reference)
    assert torch.equal(finite, torch.isfinite(scores))
    r, s = reference[finite], scores[finite]
    strictly = r[:, None] > r[None, :]
    assert bool((s[:, None] > s[None, :])[strictly].all())


def test_standardize_and_fuse():
    scores = torch.tensor([[1.0, 2.0, 3.0, -math.inf], [5.0, 5.0, 5.0, 5.0]])
    z = cand.standardize(scores)
    assert z[0, :3].mean().item() == pytest.approx(0, abs=1e-6) and z[0, :3].std(
        unbiased=False
    ).item() == pytest.approx(1)
    assert z[0, 3] == -math.inf and torch.equal(z[1], torch.zeros(4))
    llm = torch.tensor([[0.1, -2.0, -1.0, -math.inf]])
    side = torch.tensor([[10.0, 30.0, 20.0, 40.0]])
    assert torch.equal(cand.fuse(llm, side, 1.0).argsort(descending=True)[0, :3], torch.tensor([0, 2, 1]))
    assert torch.equal(cand.fuse(llm, side, 0.0).argsort(descending=True)[0, :3], torch.tensor([1, 2, 0]))
    assert cand.fuse(llm, side, 0.5)[0, 3] == -math.inf  # not scored by the LLM: not a candidate


@pytest.mark.parametrize("source", ["pop", "text", "model"])
def test_weight_zero_is_the_candidate_models_ranking(toy_config_dict, source):
    if source == "model":
        source = _sasrec_file(toy_config_dict)
    _, model, _, _, test_data = build({**toy_config_dict, "candidate_source": source, "score_fusion": 0.0})
    model.eval()
    batch = _batch(test_data)
    with torch.no_grad():
        retrieval = model.retriever.scores(batch)
        fused = model.full_sort_predict(batch).cpu()
    for row in range(len(batch)):
        _monotone(retrieval[row], fused[row])
    assert model.scorer.scored_users == 0  # weight 0: the LLM is never asked


def test_weight_zero_gives_the_candidate_models_metrics(toy_config_dict):
    """End to end through RecBole's evaluator: LLMGen at weight 0 reproduces BPR's test metrics
    (LLMGen, like RecBole for a general model, never ranks an item the user has seen)."""
    from recbole.quick_start import load_data_and_model
    from recbole.trainer import Trainer

    path = _bpr_file(toy_config_dict)
    config, bpr, _, _, _, test_data = load_data_and_model(path)
    expected = Trainer(config, bpr).evaluate(test_data, load_best_model=False)
    config, model, train_data, _, test_data = build({**toy_config_dict, "candidate_source": path, "score_fusion": 0.0})
    got = LLMGenTrainer(config, model).evaluate(test_data, load_best_model=False)
    assert dict(got) == dict(expected)


def test_weight_one_is_the_llms_ranking(toy_config_dict):
    _, alone, _, _, test_data = build(toy_config_dict)
    _, fused, *_ = build({**toy_config_dict, "score_fusion": 1.0})
    batch = _batch(test_data)
    with torch.no_grad():
        a = alone.eval().full_sort_predict(batch).cpu()
        b = fused.eval().full_sort_predict(batch).cpu()
    for row in range(len(batch)):
        _monotone(a[row], b[row])
        assert torch.topk(a[row], 10).indices.tolist() == torch.topk(b[row], 10).indices.tolist()


def test_sampled_protocol_fuses_each_users_sampled_items(toy_config_dict):
    uni = {"eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni19"}}
    _, model, _, _, test_data = build({**toy_config_dict, **uni, "score_fusion": 0.0})
    model.eval()
    batch = _batch(test_data)
    with torch.no_grad():
        scores = model.predict(batch).cpu()
    counts = torch.log1p(model.retriever.item_counts[batch[model.ITEM_ID]].float())
    users = batch[model.USER_ID]
    for user in users.unique():
        rows = (users == user).nonzero()[:, 0]
        _monotone(counts[rows], scores[rows])


def test_auto_chooses_on_valid_saves_and_reloads(toy_config_dict):
    from recbole.quick_start import load_data_and_model

    config, model, train_data, valid_data, test_data = build({**toy_config_dict, "score_fusion": "auto"})
    trainer = LLMGenTrainer(config, model)
    evaluated = record_evaluations(trainer, lambda: model.fusion_weight)
    trainer.fit(train_data, valid_data, saved=True)
    grid = [w for data, w in evaluated if data is valid_data]
    assert sorted(set(grid)) == [round(0.1 * i, 1) for i in range(11)]
    assert all(data is valid_data for data, _ in evaluated)  # the grid never sees the test split
    chosen = model.fusion_weight
    scores = {w: float(r["ndcg@10"]) for w, r in trainer.fusion_history[-1].items()}
    assert scores[chosen] == max(scores.values()) and chosen == min(w for w in scores if scores[w] == scores[chosen])
    test = trainer.evaluate(test_data)
    assert model.fusion_weight == chosen
    checkpoint = torch.load(trainer.saved_model_file, weights_only=False)
    assert checkpoint["other_parameter"]["fusion_weight"] == chosen
    config_again, reloaded, _, _, _, test_again = load_data_and_model(trainer.saved_model_file)
    assert reloaded.fusion_weight == chosen
    assert dict(LLMGenTrainer(config_again, reloaded).evaluate(test_again, load_best_model=False)) == dict(test)


def test_auto_without_validation_is_named(toy_config_dict):
    _, model, _, _, test_data = build({**toy_config_dict, "score_fusion": "auto"})
    with pytest.raises(ValueError, match="score_fusion: auto chooses its weight on the valid split, and no validation"):
        model.eval().full_sort_predict(_batch(test_data))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"score_fusion": 1.5}, r"score_fusion: 1.5 is not allowed; choose none, auto .* or a weight in \[0, 1\]"),
        ({"score_fusion": "half"}, r"score_fusion: 'half' is not allowed"),
        ({"score_fusion": -0.1}, r"score_fusion: -0.1 is not allowed"),
        (
            {"score_fusion": 0.5, "score_method": "generate", "candidate_source": "none"},
            "score_fusion: 0.5 fuses .* candidate_source: none has no candidate model",
        ),
        (
            {"candidate_source": "none"},
            "candidate_source: none .* needs score_method: generate.* likelihood scores a candidate list",
        ),
        ({"candidate_source": "none", "score_method": "verbalizer"}, "candidate_source: none .* verbalizer"),
        ({"score_method": "generate", "num_beams": 0}, r"num_beams: expected an integer >= 1, got 0"),
    ],
)
def test_bad_fusion_settings_are_named(toy_config_dict, extra, message):
    with pytest.raises(ValueError, match=message):
        build({**toy_config_dict, **extra})


def test_the_fusion_grid_scores_each_valid_user_once_and_keeps_nothing_after(toy_config_dict):
    config, model, train_data, valid_data, test_data = build({**toy_config_dict, "score_fusion": "auto"})
    users = sum(len(batch[0]) for batch in valid_data)
    trainer = LLMGenTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=False)  # 11 weights, then the validation with the chosen one
    assert len(trainer.fusion_history[-1]) == 11
    assert model.scorer.scored_users == users  # each valid user through the LLM once
    assert model.scorer.cache_size == 0  # nothing kept once the grid is done
    model.fusion_weight = 1.0  # the LLM ranks (the grid may have chosen 0, which asks it nothing)
    model.eval()
    with torch.no_grad():
        model.full_sort_predict(_batch(test_data))
        model.full_sort_predict(_batch(test_data))
    assert model.scorer.cache_size == 0  # outside scorer.cached() nothing is kept: a long-lived process stays flat
    assert model.scorer.scored_users == users + 2 * len(_batch(test_data))


def test_the_score_cache_is_bounded_and_cleared_when_weights_change(toy_config_dict):
    _, model, *_ = build(toy_config_dict)
    model.eval()
    model.scorer.cache.max_entries = 3
    histories = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
    with torch.no_grad(), model.scorer.cached():
        first = model.scorer.score(histories, [[11, 12]] * 5, [0, 1, 2, 3, 4])
        assert model.scorer.cache_size == 3  # the least recently used went first
        again = model.scorer.score(histories[-3:], [[11, 12]] * 3, [2, 3, 4])
        assert model.scorer.scored_users == 5 and all(a.equal(b) for a, b in zip(first[-3:], again))
        mixed = model.scorer.score(histories[-3:] + [[1, 3], [2, 4]], [[11, 12]] * 5, [2, 3, 4, 5, 6])
        assert model.scorer.scored_users == 7 and all(a.equal(b) for a, b in zip(first[-3:], mixed[:3]))
        assert model.scorer.cache_size == 3  # the 3 hits were read before the 2 new ones evicted them
        model.train()  # training will change the weights: the cache starts again
        assert model.scorer.cache_size == 0
    assert model.scorer.cache_size == 0
