"""Two-stage ranking: a classic RecBole model proposes, LLMGen reranks."""

import math

import pytest
import torch
from conftest import build

from recbole_llmgen.candidates import top_candidates
from recbole_llmgen.trainer import LLMGenTrainer


def _sasrec_file(toy_config_dict, **extra) -> str:
    from recbole.trainer import Trainer

    config_dict = {
        "data_path": toy_config_dict["data_path"],
        "load_col": None,
        "train_neg_sample_args": None,
        "epochs": 2,
        "hidden_size": 16,
        "inner_size": 32,
        "n_layers": 1,
        "state": "ERROR",
        "show_progress": False,
        **extra,
    }
    config, model, train_data, valid_data, _ = build(config_dict, model="SASRec")
    trainer = Trainer(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    return trainer.saved_model_file


def _batch(loader):
    batch = next(iter(loader))
    return batch[0] if isinstance(batch, tuple) else batch


def test_model_file_proposes_the_candidates(toy_config_dict):
    path = _sasrec_file(toy_config_dict)
    _, model, _, _, test_data = build({**toy_config_dict, "candidate_source": path})
    batch = _batch(test_data)
    sasrec = model.retriever.candidate_model()
    with torch.no_grad():
        expected = sasrec.full_sort_predict(batch).view(len(batch), -1)
    retrieval = model.retriever.scores(batch)
    for row in range(len(batch)):
        history = set(batch[model.ITEM_SEQ][row, : batch[model.ITEM_SEQ_LEN][row]].tolist())
        for item in range(model.n_items):
            if item == 0 or item in history:
                assert retrieval[row, item] == -math.inf
            else:
                assert retrieval[row, item] == pytest.approx(expected[row, item].item())
    # the LLM reranks exactly SASRec's top unseen items, above every other item
    scores = model.full_sort_predict(batch)
    candidates = top_candidates(retrieval, model.settings.num_candidates)
    for row in range(len(batch)):
        top = set(torch.topk(scores[row], model.settings.num_candidates).indices.tolist())
        assert top == set(candidates[row].tolist())
    assert list(model.state_dict()) == ["_extra_state"]  # SASRec is neither trained nor saved with LLMGen


def _bpr_file(toy_config_dict, **extra) -> str:
    from recbole.trainer import Trainer

    config_dict = {
        "data_path": toy_config_dict["data_path"],
        "load_col": None,
        "epochs": 3,
        "embedding_size": 8,
        "state": "ERROR",
        "show_progress": False,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        **extra,
    }
    config, model, train_data, valid_data, _ = build(config_dict, model="BPR")
    trainer = Trainer(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    return trainer.saved_model_file


FILTERED = {"item_inter_num_interval": "[2,inf)", "user_inter_num_interval": "[11,inf)"}  # 7 of 8 users, 26 of 30 items


def test_a_candidate_model_with_other_id_mappings_ranks_by_tokens(toy_config_dict):
    """BPR trained on filtered data without the item file (other user and item ids than LLMGen's):
    LLMGen ranks the candidates exactly as BPR ranks them on its own test split, token for token;
    items BPR does not know come after the ones it knows."""
    from recbole.quick_start import load_data_and_model

    from recbole_llmgen.two_stage import MappedCandidateModel

    path = _bpr_file(toy_config_dict, **FILTERED)
    config, bpr, dataset, _, _, own_test = load_data_and_model(path)
    expected = {}
    for interaction, history, _, _ in own_test:
        with torch.no_grad():
            scores = bpr.full_sort_predict(interaction).view(len(interaction), -1)
        scores[history[0], history[1]] = -math.inf
        scores[:, 0] = -math.inf
        for row, user in enumerate(interaction["user_id"].tolist()):
            order = torch.sort(scores[row], descending=True, stable=True).indices
            known = [i for i in order.tolist() if scores[row, i] > -math.inf]
            expected[dataset.id2token("user_id", user)] = [dataset.id2token("item_id", i) for i in known]

    _, model, train_data, _, test_data = build({**toy_config_dict, "candidate_source": path})  # LLMGen unfiltered
    assert isinstance(model.retriever.candidate_model(), MappedCandidateModel)
    assert model.n_items - 1 > len(dataset.field2id_token["item_id"]) - 1  # the item file adds items
    ours = train_data._dataset
    assert len(expected) < len(ours.field2id_token["user_id"]) - 1  # a user BPR never saw
    users, items = ours.field2id_token["user_id"], ours.field2id_token["item_id"]
    compared = 0
    for interaction, *_ in test_data:
        retrieval = model.retriever.scores(interaction)
        for row, user in enumerate(interaction["user_id"].tolist()):
            if str(users[user]) not in expected:
                continue  # BPR's padding user: scores, but nothing to compare with
            order = torch.sort(retrieval[row], descending=True, stable=True).indices.tolist()
            ranked = [str(items[i]) for i in order if retrieval[row, i] > -math.inf]
            mine = expected[str(users[user])]
            assert ranked[: len(mine)] == [str(t) for t in mine]  # BPR's own order, token for token
            assert not set(ranked[len(mine) :]) & set(mine)  # the rest: items BPR does not know
            compared += 1
    assert compared == len(expected)


def test_model_file_of_another_dataset_is_refused(toy_config_dict, toy_root):
    from conftest import write_toy_dataset
    from recbole.trainer import Trainer

    write_toy_dataset(toy_root, name="other")

    config, model, train_data, valid_data, _ = build(
        {"data_path": str(toy_root), "load_col": None, "train_neg_sample_args": None, "epochs": 1, "state": "ERROR"},
        dataset="other",
        model="SASRec",
    )
    trainer = Trainer(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    path = trainer.saved_model_file
    with pytest.raises(ValueError, match=r"trained on dataset 'other', not 'toy'"):
        build({**toy_config_dict, "candidate_source": path})


def test_missing_file_and_unknown_name_are_named(toy_config_dict):
    with pytest.raises(FileNotFoundError, match=r"candidate_source: model file 'saved/nope.pth' does not exist"):
        build({**toy_config_dict, "candidate_source": "saved/nope.pth"})
    with pytest.raises(ValueError, match=r"candidate_source: 'LLMGen' is not allowed|LLMGen cannot propose"):
        build({**toy_config_dict, "candidate_source": "LLMGen"})


def test_model_name_is_trained_first_and_reloads(toy_config_dict):
    from recbole.quick_start import load_data_and_model

    config_dict = {
        **toy_config_dict,
        "candidate_source": "SASRec",
        "candidate_model_config": {"epochs": 1, "hidden_size": 16, "inner_size": 32, "n_layers": 1},
    }
    config, model, train_data, valid_data, test_data = build(config_dict)
    with pytest.raises(ValueError, match="trained by LLMGenTrainer.fit"):
        model.retriever.scores(_batch(test_data))
    trainer = LLMGenTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    assert model.candidate_model_file and model.candidate_model_file.endswith(".pth")
    assert type(model.retriever.candidate_model()).__name__ == "SASRec"
    batch = _batch(test_data)
    expected = model.full_sort_predict(batch)
    _, reloaded, *_ = load_data_and_model(trainer.saved_model_file)
    assert reloaded.candidate_model_file == model.candidate_model_file
    torch.testing.assert_close(reloaded.full_sort_predict(batch), expected, rtol=0, atol=1e-5)


def test_a_candidate_model_of_too_little_of_the_data_is_refused_with_the_counts(toy_config_dict, tmp_path):
    """A checkpoint of the same dataset name that knows under half of the run's items is refused, the
    counts named; one that misses a few users (a general model) is used, with a warning that names them."""
    other = tmp_path / "elsewhere" / "toy"  # a dataset also named toy that shares 3 of its 30 items
    other.mkdir(parents=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    lines += [
        f"v{u}\t{'i' if k < 3 else 'j'}{(u + k) % 30 if k >= 3 else k}\t{u * 100 + k}"
        for u in range(8)
        for k in range(12)
    ]
    (other / "toy.inter").write_text("\n".join(lines) + "\n")
    sparse = _bpr_file({**toy_config_dict, "data_path": str(other.parent)})
    with pytest.raises(ValueError, match=r"knows 3 of this run's 30 item tokens of 'toy' \(10%; at least 50% needed\)"):
        build({**toy_config_dict, "candidate_source": sparse})
    filtered = _bpr_file(toy_config_dict, **FILTERED)
    with pytest.warns(UserWarning, match=r"knows 7 of this run's 8 users; the others get its padding user's scores"):
        build({**toy_config_dict, "candidate_source": filtered})
