"""``seen_items``: one ranking rule for every model, RecBole's sequential models included."""

from __future__ import annotations

import pytest
import torch
from conftest import bench_overrides, build, ranking_metrics

from recbole_llmgen import benchmark, seen_items
from recbole_llmgen.compat import original

SMALL = {"hidden_size": 16, "inner_size": 32, "embedding_size": 16, "train_neg_sample_args": None, "load_col": None}


def raw_histories(root, name: str = "toy") -> dict[str, list[str]]:
    """Each user's item tokens in time order, read from the .inter file itself."""
    rows = []
    with open(root / name / f"{name}.inter", encoding="utf-8") as f:
        next(f)
        for line in f:
            user, item, _, time = line.rstrip("\n").split("\t")
            rows.append((user, float(time), item))
    histories: dict[str, list[str]] = {}
    for user, _, item in sorted(rows):
        histories.setdefault(user, []).append(item)
    return histories


def evaluate(config, model, data) -> dict:
    from recbole.utils import get_trainer

    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    result = trainer.evaluate(data, load_best_model=False, show_progress=False)
    return {k: round(float(result[k]), 4) for k in ("ndcg@10", "hit@10")}


@pytest.mark.parametrize("rule", ["mask", "keep"])
def test_sequential_masked_metrics_equal_a_computation_by_hand(toy_config_dict, toy_root, rule):
    """SASRec (RecBole masks nothing for sequential models): under ``mask`` every item the user
    rated before the test item leaves the ranking, under ``keep`` none does; both equal the metric
    computed by hand from its ``full_sort_predict`` scores and the raw file."""
    config, model, _, _, test_data = build({**toy_config_dict, **SMALL, "seen_items": rule}, model="SASRec")
    model.eval()
    dataset = test_data._dataset
    inter = dataset.inter_feat
    with torch.no_grad():
        scores = model.full_sort_predict(inter)  # [users, n_items]
    tokens = dataset.field2id_token["user_id"][inter["user_id"].numpy()]
    item_id = dataset.field2token_id["item_id"]
    histories = raw_histories(toy_root)
    targets = inter["item_id"].tolist()
    assert [item_id[histories[u][-1]] for u in tokens] == targets  # leave-one-out: the last one is tested
    earlier = [[item_id[i] for i in histories[u][:-1]] for u in tokens]
    unmasked = ranking_metrics(scores, targets, [[] for _ in tokens])
    masked = ranking_metrics(scores, targets, earlier)
    assert evaluate(config, model, test_data) == (masked if rule == "mask" else unmasked)
    assert masked["ndcg@10"] > unmasked["ndcg@10"]  # the rule matters on these scores: the test can fail


def test_a_general_models_mask_is_recboles_own_and_keep_drops_it(toy_config_dict):
    """BPR: RecBole already masks its users' earlier items, so ``mask`` hands the trainer exactly
    RecBole's history; ``keep`` hands it none."""
    from recbole.data.dataloader.general_dataloader import FullSortEvalDataLoader

    recbole_collate = original(FullSortEvalDataLoader, "collate_fn")
    for rule in ("mask", "keep"):
        *_, test_data = build({**toy_config_dict, **SMALL, "seen_items": rule}, model="BPR")
        index = list(range(len(test_data.user_df)))
        ours, theirs = test_data.collate_fn(index), recbole_collate(test_data, index)
        if rule == "mask":
            assert all(torch.equal(a, b) for a, b in zip(ours[1], theirs[1])) and len(theirs[1][1]) > 0
        else:
            assert ours[1] is None and theirs[1] is not None
        assert torch.equal(ours[3], theirs[3])  # the positives are RecBole's either way


def test_a_sample_of_users_masks_what_the_whole_split_masks(toy_config_dict):
    from recbole_llmgen.integration import only_users

    *_, test_data = build({**toy_config_dict, **SMALL}, model="SASRec")
    tokens = ["u1", "u5"]
    sample = only_users(test_data, tokens)
    whole = seen_items.seen_rows(test_data)
    users = test_data._dataset.field2id_token["user_id"][test_data._dataset.inter_feat["user_id"].numpy()]
    expected = [whole[i] for i, u in enumerate(users) if u in tokens]
    assert [r.tolist() for r in seen_items.seen_rows(sample)] == [r.tolist() for r in expected]


def test_valid_rows_mask_training_items_only(toy_config_dict, toy_root):
    *_, valid_data, _ = build({**toy_config_dict, **SMALL}, model="SASRec")
    dataset = valid_data._dataset
    item_id = dataset.field2token_id["item_id"]
    histories = raw_histories(toy_root)
    users = dataset.field2id_token["user_id"][dataset.inter_feat["user_id"].numpy()]
    for user, row in zip(users, seen_items.seen_rows(valid_data)):
        assert sorted(row.tolist()) == sorted(item_id[i] for i in histories[user][:-2])


def test_a_bad_rule_is_named(toy_config_dict):
    with pytest.raises(ValueError, match=r"seen_items: 'hide' is not allowed; choose mask .* or keep"):
        build({**toy_config_dict, **SMALL, "seen_items": "hide"}, model="SASRec")


def test_benchmark_rows_under_each_rule_against_recboles_own_run(toy_config_dict, tmp_path, monkeypatch):
    """``keep`` reproduces RecBole's own run of a sequential model, ``mask`` RecBole's own run of a
    general one (Pop, BPR: RecBole masks them already); the other way round they differ. The rule
    is a column of the csv and said in the table's caption."""
    from recbole.data.dataloader.general_dataloader import FullSortEvalDataLoader

    from recbole_llmgen.integration import recbole_argv

    models = ["Pop", "BPR", "SASRec"]
    rows = {}
    for rule in ("mask", "keep"):
        out = str(tmp_path / rule)
        got = benchmark.run_benchmark("toy", models, "full", None, bench_overrides(toy_config_dict, seen_items=rule),
                                      out, log=lambda m: None, runner=benchmark.run_in_process)  # fmt: skip
        rows[rule] = {r["model"]: r for r in got}
        assert all(r["seen_items"] == rule for r in got)
        table = open(f"{out}/benchmark.md", encoding="utf-8").read()
        assert f"seen items: {rule}" in table.lower()
        assert ",seen_items," in open(f"{out}/benchmark.csv", encoding="utf-8").readline()

    # RecBole's own evaluation (its collate, no rule), with the benchmark's config of each model
    monkeypatch.setattr(FullSortEvalDataLoader, "collate_fn", original(FullSortEvalDataLoader, "collate_fn"))
    from recbole.quick_start import run_recbole

    own = {}
    for model in models:
        spec_config = benchmark.model_config(
            model, "toy", "full", bench_overrides(toy_config_dict), str(tmp_path / "own")
        )
        with recbole_argv([]):
            own[model] = run_recbole(model=model, dataset="toy", config_dict=spec_config, saved=True)["test_result"]
    for model, rule in (("Pop", "mask"), ("BPR", "mask"), ("SASRec", "keep")):
        assert rows[rule][model]["test_ndcg@10"] == round(float(own[model]["ndcg@10"]), 4), model
        assert rows[rule][model]["test_hit@10"] == round(float(own[model]["hit@10"]), 4), model
    # the other rule changes every one of them on these data
    for model, rule in (("Pop", "keep"), ("BPR", "keep"), ("SASRec", "mask")):
        assert rows[rule][model]["test_ndcg@10"] != round(float(own[model]["ndcg@10"]), 4), model


@pytest.mark.parametrize("rule", ["mask", "keep"])
def test_llmgen_follows_the_rule(toy_config_dict, toy_root, rule):
    """LLMGen masks every earlier item itself under ``mask`` (candidates and the ranking below them)
    and none under ``keep``, where popularity puts seen items among its candidates."""
    config = {**toy_config_dict, "candidate_source": "pop", "num_candidates": 5, "seen_items": rule}
    _, model, *_, test_data = build(config)
    inter = test_data._dataset.inter_feat
    with torch.no_grad():
        scores = model.full_sort_predict(inter)  # [users, n_items]
    dataset = test_data._dataset
    tokens = dataset.field2id_token["user_id"][inter["user_id"].numpy()]
    item_id = dataset.field2token_id["item_id"]
    histories = raw_histories(toy_root)
    earlier = [[item_id[i] for i in histories[u][:-1]] for u in tokens]
    seen_scores = torch.stack([scores[b, items].max() for b, items in enumerate(earlier)])
    if rule == "mask":
        assert torch.isinf(seen_scores).all()
    else:
        assert torch.isfinite(seen_scores).all()
        top = scores.topk(5).indices
        assert any(set(top[b].tolist()) & set(earlier[b]) for b in range(len(earlier)))  # seen items proposed


def test_the_benchmarks_rule_comes_from_the_option_else_the_files_top_level(tmp_path):
    from recbole_llmgen.benchmark.plan import check_arguments

    top = tmp_path / "top.yaml"
    top.write_text("seen_items: keep\nLLMGen:\n  num_candidates: 5\n")
    section = tmp_path / "section.yaml"
    section.write_text("LLMGen:\n  seen_items: keep\n")  # one model's rule alone would split the table
    assert check_arguments(["Pop"], "full", None, {}, 1)["seen_items"] == "mask"
    assert check_arguments(["Pop"], "full", [str(top)], {}, 1)["seen_items"] == "keep"
    assert check_arguments(["Pop"], "full", [str(top)], {"seen_items": "mask"}, 1)["seen_items"] == "mask"
    assert check_arguments(["Pop"], "full", [str(section)], {}, 1)["seen_items"] == "mask"  # the override wins there
    with pytest.raises(ValueError, match="seen_items: 'all' is not allowed"):
        check_arguments(["Pop"], "full", None, {"seen_items": "all"}, 1)


def test_llmgens_metrics_do_not_change_under_mask(toy_config_dict, monkeypatch):
    """LLMGen masked every earlier item before the rule existed: evaluated with the rule's mask and
    with RecBole's own sequential collate (no mask), its metrics are the same."""
    from recbole.data.dataloader.general_dataloader import FullSortEvalDataLoader

    config, model, *_, test_data = build({**toy_config_dict, "candidate_source": "pop", "num_candidates": 5})
    ruled = evaluate(config, model, test_data)
    monkeypatch.setattr(FullSortEvalDataLoader, "collate_fn", original(FullSortEvalDataLoader, "collate_fn"))
    assert evaluate(config, model, test_data) == ruled
