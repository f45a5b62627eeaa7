"""Feedback that teaches (`run|benchmark --feedback FILE`): the liked items of chat feedback files
join the training split only; dislikes, new users and items the user already has are left out,
counted; the run hash follows the files' contents."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import bench_overrides, build

from recbole_llmgen.feedback import USED, check_config
from recbole_llmgen.sequence import training_sequences


def _feedback_file(path, rows):
    """A feedback file as Session.save_feedback writes it: (user, item, rating, time) rows."""
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float\tfeedback_session:token"]
    lines += [f"{u}\t{i}\t{r:g}\t{t}\ts1" for u, i, r, t in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _items_of(dataset, user: int) -> set[int]:
    inter = dataset.inter_feat
    return set(inter[dataset.iid_field][inter[dataset.uid_field] == user].tolist())


def _plan(toy_config_dict, tmp_path):
    """u1's feedback: two new likes (one liked after a dislike), a dislike, a like of an item u1
    already has; a like by a user the dataset lacks. Returns the file, the inner ids."""
    config, _, train, valid, test = build({**toy_config_dict}, model="Pop")
    ds = train.dataset
    u1 = ds.field2token_id["user_id"]["u1"]
    mine = _items_of(train.dataset, u1) | _items_of(valid.dataset, u1) | _items_of(test.dataset, u1)
    fresh = [t for t, i in ds.field2token_id["item_id"].items() if i and i not in mine]
    own = str(ds.id2token("item_id", sorted(mine)[0]))
    rows = [("u1", fresh[0], 1, 10), ("u1", fresh[1], 5, 11), ("u1", fresh[0], 5, 12), ("u1", fresh[2], 1, 13),
            ("u1", own, 5, 14), ("stranger", fresh[3], 5, 15)]  # fmt: skip
    path = _feedback_file(tmp_path / "fb.inter", rows)
    ids = ds.field2token_id["item_id"]
    _plan.tokens = {"liked": {fresh[0], fresh[1]}, "disliked": {fresh[2]}}
    return path, u1, [ids[fresh[1]], ids[fresh[0]]]  # in time order of their last verdict


SMALL = {"hidden_size": 16, "inner_size": 32, "embedding_size": 16, "train_neg_sample_args": None, "load_col": None}
COUNTS = {"feedback_rows": 2, "feedback_dislikes": 1, "feedback_new_users": 1, "feedback_known": 1}


@pytest.mark.parametrize("model", ["BPR", "SASRec"])
def test_likes_join_the_training_split_only(toy_config_dict, tmp_path, model):
    """A general model's training split gains one (user, item) row per new like, with the split's
    top rating; a sequential model's gains rows that continue the user's training sequence (its
    history grows by the last target, then by each like); valid and test are untouched."""
    path, u1, likes = _plan(toy_config_dict, tmp_path)
    settings = {**toy_config_dict, **(SMALL if model == "SASRec" else {})}
    settings["load_col"] = {"inter": ["user_id", "item_id", "rating", "timestamp"]}
    _, _, train0, valid0, test0 = build(settings, model=model)
    _, _, train, valid, test = build({**settings, "feedback": [path]}, model=model)
    assert getattr(train.dataset, USED) == COUNTS
    before, after = train0.dataset.inter_feat, train.dataset.inter_feat
    assert len(after) == len(before) + 2
    added = after[len(before) :]
    assert added["user_id"].tolist() == [u1, u1] and added["item_id"].tolist() == likes
    assert torch.equal(added["rating"], torch.full((2,), float(before["rating"].max())))
    for field in before.interaction:  # the old rows are where they were
        assert torch.equal(after[field][: len(before)], before[field])
    for old, new in ((valid0, valid), (test0, test)):
        for field in old.dataset.inter_feat.interaction:
            assert torch.equal(old.dataset.inter_feat[field], new.dataset.inter_feat[field])
    if model == "SASRec":
        assert training_sequences(train.dataset)[u1] == training_sequences(train0.dataset)[u1] + likes
    else:  # the sampler knows them: a liked item is never drawn as u1's negative
        used = train._sampler.used_ids[u1]
        assert set(likes) <= set(used)


def test_an_llmgen_trains_on_the_likes_and_never_proposes_them(toy_config_dict, tmp_path):
    """LLMGen's training windows end with the likes; its candidates never hold a liked item."""
    path, u1, likes = _plan(toy_config_dict, tmp_path)
    _, model, train, _, test = build(
        {**toy_config_dict, "feedback": [path], "llm_train_objective": "sequence", "prompt_format": "list"}
    )
    assert training_sequences(train.dataset)[u1][-2:] == likes
    assert set(likes) <= set(model.retriever.seen(u1, []))


def test_feedback_key_errors_name_the_file(tmp_path, toy_config_dict):
    plain = tmp_path / "toy.inter"
    plain.write_text("user_id:token\titem_id:token\nu1\ti1\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="feedback: 'nowhere.inter' does not exist"):
        check_config(["nowhere.inter"])
    with pytest.raises(ValueError, match=r"toy.inter' is not a feedback file written by recbole-llmgen"):
        check_config(str(plain))
    with pytest.raises(ValueError, match="feedback: 5 is not a feedback file"):
        check_config(5)
    assert check_config(None) is None and check_config([]) is None
    with pytest.raises(ValueError, match="is not a feedback file"):  # on every Config, before data is read
        build({**toy_config_dict, "feedback": str(plain)}, model="Pop")
    bad = _feedback_file(tmp_path / "bad.inter", [("u1", "no-such-item", 5, 1)])
    with pytest.raises(ValueError, match="line 2: item 'no-such-item' is not an item of this dataset"):
        build({**toy_config_dict, "feedback": bad}, model="Pop")


def test_benchmark_feedback_rows_and_rerun_on_changed_contents(toy_config_dict, tmp_path):
    """benchmark --feedback: each row says how many feedback rows it trained on; changing the
    file's contents (same name) runs the row again, an unchanged rerun reuses it."""
    from recbole_llmgen.benchmark import run_benchmark
    from recbole_llmgen.cli import main

    path, _, _ = _plan(toy_config_dict, tmp_path)
    out = str(tmp_path / "bench")
    overrides = {**bench_overrides(toy_config_dict), "feedback": [path]}
    logs: list[str] = []
    rows = run_benchmark("toy", ["Pop"], overrides=overrides, out=out, log=logs.append)
    assert {k: rows[0][k] for k in COUNTS} == COUNTS
    assert "feedback" in json.load(open(f"{out}/runs/Pop.json"))["inputs"]
    logs.clear()
    run_benchmark("toy", ["Pop"], overrides=overrides, out=out, log=logs.append)
    assert any("Pop: finished before with the same config, reused" in line for line in logs), logs
    with open(path, "a", encoding="utf-8") as f:  # one more dislike: same name, other contents
        f.write("u2\ti3\t1\t20\ts2\n")
    logs.clear()
    rows = run_benchmark("toy", ["Pop"], overrides=overrides, out=out, log=logs.append)
    assert rows[0]["feedback_dislikes"] == 2 and any("Pop: running" in line for line in logs), logs
    with pytest.raises(SystemExit, match="is not a feedback file"):
        main(["run", "--model", "Pop", "--dataset", "toy", "--feedback", str(tmp_path / "bench" / "runs" / "Pop.json"),
              f"--data_path={toy_config_dict['data_path']}"])  # fmt: skip


def test_a_model_trained_on_feedback_loads_after_the_file_is_gone(toy_config_dict, tmp_path):
    """The checkpoint of a run with feedback names the files; once they are gone it still loads
    (a warning, the split without them), never an error that strands the trained model."""
    from recbole.quick_start import load_data_and_model

    from recbole_llmgen import recommend
    from recbole_llmgen.quick_start import run_recbole

    path, u1, likes = _plan(toy_config_dict, tmp_path)
    settings = {**toy_config_dict, **SMALL, "epochs": 1, "feedback": [path], "checkpoint_dir": str(tmp_path / "saved")}
    run_recbole(model="SASRec", dataset="toy", config_dict=settings)
    (saved,) = (tmp_path / "saved").glob("SASRec-*.pth")
    config, _, _, train, _, _ = load_data_and_model(str(saved))
    assert getattr(train.dataset, USED)["feedback_rows"] == 2
    # recommend with the model knows what it was trained on: the likes end the history, nothing liked
    # or disliked is proposed; the same list as naming the file
    frame = recommend("u1", topk=30, model_file=str(saved))  # every item it may propose
    assert len(frame) == 30 - 12 - 3 and not set(frame["item_id"]) & (_plan.tokens["liked"] | _plan.tokens["disliked"])
    assert (
        frame["item_id"].tolist()
        == recommend("u1", topk=30, model_file=str(saved), feedback=[path])["item_id"].tolist()
    )
    (tmp_path / "fb.inter").unlink()
    config, model, _, train, _, _ = load_data_and_model(str(saved))
    assert config["feedback"] == [path] and not hasattr(train.dataset, USED)
    assert training_sequences(train.dataset)[u1][-2:] != likes
