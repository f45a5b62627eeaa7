"""recommend(): per-user top-k with original ids, explanations that never change the ranking."""

import json
import math

import pandas as pd
import pytest

from recbole_llmgen import recommend
from recbole_llmgen.recommend import COLUMNS


def _history_tokens(root, user):
    inter = pd.read_csv(root / "toy" / "toy.inter", sep="\t", dtype=str)
    return set(inter[inter["user_id:token"] == user]["item_id:token"])


def test_recommend_rows(toy_config_dict, toy_root):
    frame = recommend(["u1", "u3"], topk=4, dataset="toy", config_dict=toy_config_dict)
    assert list(frame.columns) == COLUMNS
    for user in ("u1", "u3"):
        rows = frame[frame["user_id"] == user]
        assert rows["rank"].tolist() == [1, 2, 3, 4]
        assert rows["item_id"].is_unique and all(i.startswith("i") for i in rows["item_id"])
        assert not set(rows["item_id"]) & _history_tokens(toy_root, user)  # nothing already seen
        assert rows["score"].is_monotonic_decreasing and all(math.isfinite(s) for s in rows["score"])
        assert all(t.startswith("Movie ") for t in rows["item_text"])
        assert (rows["explanation"] == "").all()


def test_explanations_do_not_change_the_ranking(toy_config_dict):
    config = dict(toy_config_dict, score_method="generate", num_beams=8)
    plain = recommend("u2", topk=3, dataset="toy", config_dict=config)
    explained = recommend("u2", topk=3, dataset="toy", config_dict=config, explain=True, max_explanation_tokens=8)
    assert plain["item_id"].tolist() == explained["item_id"].tolist()
    assert all(len(e) > 0 for e in explained["explanation"])


def test_unknown_user_and_bad_topk(toy_config_dict):
    with pytest.raises(ValueError, match=r"user_id: \['nobody'\] not in dataset 'toy' \(8 users, e.g. u0"):
        recommend(["nobody"], dataset="toy", config_dict=toy_config_dict)
    with pytest.raises(ValueError, match="topk: expected an integer >= 1"):
        recommend(["u1"], topk=0, dataset="toy", config_dict=toy_config_dict)


def test_model_file_round_trip_and_dataset_check(toy_config_dict, tmp_path):
    from recbole.quick_start import run_recbole

    run_recbole(model="LLMGen", dataset="toy", config_dict=dict(toy_config_dict, checkpoint_dir=str(tmp_path / "s")))
    (model_file,) = (tmp_path / "s").glob("LLMGen-*.pth")
    from_file = recommend("u1", topk=3, model_file=str(model_file))
    from_config = recommend("u1", topk=3, dataset="toy", config_dict=toy_config_dict)
    assert from_file["item_id"].tolist() == from_config["item_id"].tolist()
    with pytest.raises(ValueError, match=r"model_file: .* was trained on dataset 'toy', not 'ml-100k'"):
        recommend("1", model_file=str(model_file), dataset="ml-100k")


def test_cli_recommend_json(toy_config_dict, tmp_path, capsys):
    from recbole_llmgen.cli import main

    out = tmp_path / "recs.json"
    args = [f"--{k}={v}" for k, v in toy_config_dict.items()]
    code = main(
        ["recommend", "--dataset", "toy", "--user", "u0", "--user", "u5", "--topk", "2", "--json", str(out), *args]
    )
    assert code == 0
    assert "user u0" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert len(rows) == 4 and set(rows[0]) == set(COLUMNS)


def test_first_sentences():
    from recbole_llmgen.recommend import first_sentences

    assert first_sentences("One. Two! Three? Four.", 2) == "One. Two!"
    assert first_sentences("No end", 2) == "No end"


@pytest.mark.parametrize("model", ["BPR", "SASRec"])
def test_a_classic_model_file_recommends_unseen_items_in_its_own_order(toy_config_dict, toy_root, tmp_path, model):
    """recommend works with any RecBole model file, general (its user) or sequential (the history):
    the list is the model's full_sort_predict order with every item the user has seen left out."""
    import torch
    from recbole.quick_start import load_data_and_model, run_recbole

    settings = dict(toy_config_dict, epochs=1, hidden_size=16, inner_size=32, embedding_size=16, load_col=None,
                    checkpoint_dir=str(tmp_path / "s"), train_neg_sample_args=None if model == "SASRec" else {})  # fmt: skip
    if model == "BPR":
        settings.pop("train_neg_sample_args")
    run_recbole(model=model, dataset="toy", config_dict=settings)
    (model_file,) = (tmp_path / "s").glob(f"{model}-*.pth")
    frame = recommend("u1", topk=5, model_file=str(model_file))
    seen = _history_tokens(toy_root, "u1")
    assert len(frame) == 5 and not set(frame["item_id"]) & seen
    titles = pd.read_csv(toy_root / "toy" / "toy.item", sep="\t", dtype=str).set_index("item_id:token")
    assert frame["item_text"].tolist() == [
        f"{titles.loc[i, 'title:token_seq']} ({titles.loc[i, 'year:token']})" for i in frame["item_id"]
    ]  # the .item file's title (year)
    config, rec, full, *_ = load_data_and_model(str(model_file))  # the order by hand
    uid, iid = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
    u = full.field2token_id[uid]["u1"]
    from recbole.data.interaction import Interaction

    fields = {uid: torch.tensor([u])}
    if model == "SASRec":
        raw = pd.read_csv(toy_root / "toy" / "toy.inter", sep="\t", dtype=str)  # the history from the file itself
        raw = raw[raw["user_id:token"] == "u1"].sort_values("timestamp:float", key=lambda t: t.astype(float))
        ids = full.field2token_id[iid]
        history = torch.tensor([ids[t] for t in raw["item_id:token"]])[-config["MAX_ITEM_LIST_LENGTH"] :]
        seq = torch.zeros(1, config["MAX_ITEM_LIST_LENGTH"], dtype=torch.long)
        seq[0, : len(history)] = history
        fields.update({rec.ITEM_SEQ: seq, rec.ITEM_SEQ_LEN: torch.tensor([len(history)])})
    rec.eval()
    with torch.no_grad():
        scores = rec.full_sort_predict(Interaction(fields)).view(-1)
    ranked = [full.id2token(iid, i) for i in torch.argsort(scores, descending=True, stable=True).tolist() if i]
    assert frame["item_id"].tolist() == [i for i in ranked if i not in seen][:5]
