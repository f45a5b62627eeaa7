"""Data regimes (sparse training data, cold users and items) and the benchmark sweep over them."""

import csv
import os

import numpy as np
import pytest
from conftest import bench_overrides

from recbole_llmgen import benchmark, per_user, regime
from recbole_llmgen.cli import main
from recbole_llmgen.sweep import parse_sweep, run_sweep

FIELDS = {"user": "user_id", "item": "item_id", "time": "timestamp"}


def _tied_dataset(root, name="tied", n_users=6, per_user=9):
    """Interactions with many equal timestamps, rows not in time order: RecBole's stable sort decides."""
    rng = np.random.default_rng(3)
    folder = root / name
    folder.mkdir(parents=True)
    rows = []
    for u in range(n_users):
        for i in rng.choice(20, per_user, replace=False):
            rows.append(f"u{u}\ti{i}\t{int(rng.integers(1, 6))}\t{int(rng.integers(0, 4))}")
    order = rng.permutation(len(rows))
    with open(folder / f"{name}.inter", "w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        f.write("\n".join(rows[i] for i in order) + "\n")
    return root


def _config(config_dict, dataset):
    from recbole.config import Config

    split = {"load_col": None, "eval_args": benchmark.split_args("full"), "state": "ERROR"}  # the benchmark's
    return Config(model="Pop", dataset=dataset, config_dict={**config_dict, **split})


def _recbole_split(config_dict, dataset):
    """Per user: (training item tokens, test target token) as RecBole's general-model split gives them."""
    from recbole.data import create_dataset

    full = create_dataset(_config(config_dict, dataset))
    train, _, test = full.build()
    tokens_u, tokens_i = full.field2id_token["user_id"], full.field2id_token["item_id"]
    seen, targets = {}, {}
    for u, i in zip(train.inter_feat["user_id"].tolist(), train.inter_feat["item_id"].tolist()):
        seen.setdefault(str(tokens_u[u]), []).append(str(tokens_i[i]))
    for u, i in zip(test.inter_feat["user_id"].tolist(), test.inter_feat["item_id"].tolist()):
        targets[str(tokens_u[u])] = str(tokens_i[i])
    return seen, targets


def _same_as_recbole(table, seen, targets):
    assert set(table.index) == set(targets)
    assert table["target"].to_dict() == targets
    assert table["train_items"].to_dict() == {u: len(seen.get(u, [])) for u in table.index}
    counts = {}
    for items_of_user in seen.values():
        for item in items_of_user:
            counts[item] = counts.get(item, 0) + 1
    assert [counts.get(t, 0) for t in table["target"]] == table["target_train_count"].tolist()


@pytest.mark.parametrize("dataset", ["tied", "ml-100k"])
def test_split_and_reduced_copy_follow_recbole(dataset, tmp_path):
    """Tied timestamps (file order decides) and ml-100k (float32 normalised times: seconds apart tie)."""
    settings = {"data_path": str(_tied_dataset(tmp_path / "datasets"))} if dataset == "tied" else {}
    _, table = regime.prepare(regime.Regime(), _config(settings, dataset), str(tmp_path / "out"))
    seen_full, targets_full = _recbole_split(settings, dataset)
    _same_as_recbole(table, seen_full, targets_full)

    # the copy at 0.3: RecBole splits it with the same test targets, training only from kept rows
    data_path, table = regime.prepare(regime.Regime(0.3), _config(settings, dataset), str(tmp_path / "out"))
    assert data_path.endswith(os.path.join("data", "fraction-0.3-seed-2020"))
    seen, targets = _recbole_split({"data_path": data_path}, dataset)
    assert targets == targets_full
    assert all(set(seen[u]) <= set(seen_full[u]) for u in seen)
    _same_as_recbole(table, seen, targets)
    assert sum(map(len, seen.values())) < 0.35 * sum(map(len, seen_full.values()))


def test_fraction_keeps_targets_and_a_seeded_nested_share_of_training(tmp_path):
    root = _tied_dataset(tmp_path / "datasets", per_user=14)
    _, lines, users, items, times = regime.read_interactions(str(root / "tied"), "tied", FIELDS)
    split = regime.split_positions(users, times)
    held = {int(i) for _, h in split.values() for i in h}
    kept = {f: set(regime.kept_rows(split, len(lines), f, seed=2020).tolist()) for f in (0.1, 0.5, 1.0)}
    assert kept[1.0] == set(range(len(lines)))
    assert held <= kept[0.1] <= kept[0.5] <= kept[1.0]  # a smaller fraction keeps a subset
    for train, _ in split.values():
        assert len(kept[0.1] & set(train.tolist())) == regime.MIN_TRAIN  # round(0.1 * 12) = 1 < 2
        assert len(kept[0.5] & set(train.tolist())) == 6
    assert set(regime.kept_rows(split, len(lines), 0.5, seed=2020).tolist()) == kept[0.5]
    assert set(regime.kept_rows(split, len(lines), 0.5, seed=7).tolist()) != kept[0.5]
    assert 0 in set(regime.kept_rows(split, len(lines), 0.1, seed=2020, always=[0]).tolist())


def test_bad_regimes_are_named(toy_config_dict, tmp_path):
    for value in (0, 1.5, -0.2, "half", True):
        with pytest.raises(ValueError, match=r"train_fraction: expected a number in \(0, 1\]"):
            regime.check_regime(train_fraction=value)
    with pytest.raises(ValueError, match="cold_users: expected an integer >= 0"):
        regime.check_regime(cold_users=-1)
    with pytest.raises(ValueError, match="cold_items: expected an integer >= 0"):
        regime.check_regime(cold_items=2.5)

    def runner(spec, log_path):
        raise AssertionError("no model may run")

    with pytest.raises(ValueError, match=r"leaves no user to evaluate \(fewest training interactions of a user: 10"):
        benchmark.run_benchmark("toy", ["Pop"], "full", None, bench_overrides(toy_config_dict), str(tmp_path / "b"),
                                log=lambda m: None, runner=runner, regime=regime.check_regime(cold_users=3))  # fmt: skip
    with pytest.raises(SystemExit, match="recbole-llmgen benchmark: train_fraction: expected a number in"):
        main(["benchmark", "--dataset", "toy", "--models", "Pop", "--train_fraction", "0", "--out", str(tmp_path / "c"),
              f"--data_path={toy_config_dict['data_path']}"])  # fmt: skip
    # RecBole's own filtering changes the split the file's counts describe: refused, not miscounted
    filtered = bench_overrides(toy_config_dict, item_inter_num_interval="[4,inf)")
    with pytest.raises(
        ValueError, match=r"data regime: RecBole keeps \d+ of the 96 rows of toy.inter \(filters such as"
    ):
        benchmark.run_benchmark("toy", ["Pop"], "full", None, filtered, str(tmp_path / "d"), log=lambda m: None,
                                runner=benchmark.run_in_process, regime=regime.check_regime(cold_items=100))  # fmt: skip


def test_cold_users_are_the_mean_of_their_per_user_values(toy_config_dict, toy_root, tmp_path):
    # make users u0..u3 sparse: drop most of their early interactions from the file
    path = toy_root / "toy" / "toy.inter"
    header, *lines = path.read_text(encoding="utf-8").splitlines()
    lines = [
        line for k, line in enumerate(lines) if not (line.split("\t")[0] in {"u0", "u1", "u2", "u3"} and k % 12 < 8)
    ]
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    out = str(tmp_path / "cold")
    chosen = regime.check_regime(train_fraction=0.6, cold_users=2)
    rows = benchmark.run_benchmark("toy", ["Pop", "BPR", "LLMGen"], "full", None, bench_overrides(toy_config_dict), out,
                                   log=lambda m: None, runner=benchmark.run_in_process, regime=chosen)  # fmt: skip
    assert [r["status"] for r in rows] == ["ok"] * 4  # the text retriever's row too
    for row in rows:
        frame = per_user.read_users(os.path.join(out, "runs", row["model"]))
        assert len(frame) == 8  # every user evaluated by RecBole ...
        cold = frame.loc[["u0", "u1", "u2", "u3"]]  # ... the table only over those with <= 2 training items
        assert row["users"] == 4 and row["avg_train_items"] == 2.0
        assert row["test_ndcg@10"] == round(cold["ndcg@10"].mean(), 4)
        assert row["test_hit@10"] == round(cold["hit@10"].mean(), 4)
    table = open(os.path.join(out, "benchmark.md"), encoding="utf-8").read()
    assert "Regime: train fraction 0.6 (at least 2 training items per user); users with <= 2 training" in table
    assert "Evaluated users: 4, average training history 2.0" in table
    with open(os.path.join(out, "benchmark.csv"), encoding="utf-8") as f:
        assert {r["cold_users"] for r in csv.DictReader(f)} == {"2"}


def test_sweep_cells_equal_single_runs_and_are_reused(toy_config_dict, tmp_path):
    models = ["Pop", "BPR", "LLMGen"]
    overrides = bench_overrides(toy_config_dict)
    out = str(tmp_path / "sweep")
    rows = run_sweep("train_fraction", [0.3, 1.0], "toy", models, "full", None, overrides, out, log=lambda m: None,
                     runner=benchmark.run_in_process)  # fmt: skip
    names = ["Pop", "BPR", "TextRetriever", "LLMGen"]  # the text retriever's row before LLMGen
    assert [(r["sweep_value"], r["row"]) for r in rows] == [(v, m) for v in (0.3, 1.0) for m in names]
    single = benchmark.run_benchmark("toy", models, "full", None, overrides, str(tmp_path / "single"),
                                     log=lambda m: None, runner=benchmark.run_in_process,
                                     regime=regime.check_regime(train_fraction=0.3))  # fmt: skip
    plain = benchmark.run_benchmark("toy", models, "full", None, overrides, str(tmp_path / "plain"),
                                    log=lambda m: None, runner=benchmark.run_in_process)  # fmt: skip
    metrics = [k for k in single[0] if k.startswith("test_")]
    assert metrics
    for cell, reference in ((rows[:4], single), (rows[4:], plain)):
        for a, b in zip(cell, reference):
            assert {k: a[k] for k in metrics} == {k: b[k] for k in metrics}
            assert a["users"] == b["users"] == 8
    assert rows[0]["avg_train_items"] == 3.0 and rows[4]["avg_train_items"] == 10.0
    for name in ("sweep.csv", "sweep.md", "sweep.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    markdown = open(os.path.join(out, "sweep.md"), encoding="utf-8").read()
    assert "| model | train_fraction 0.3 | train_fraction 1 |" in markdown
    assert "| average training history | 3.0 | 10.0 |" in markdown

    ran = []

    def runner(spec, log_path):
        ran.append(spec["model"])
        return benchmark.run_in_process(spec, log_path)

    again = run_sweep("train_fraction", [0.3, 1.0], "toy", models, "full", None, overrides, out, log=lambda m: None,
                      runner=runner)  # fmt: skip
    assert ran == [] and [r["test_ndcg@10"] for r in again] == [r["test_ndcg@10"] for r in rows]


def test_sweep_arguments_are_named(toy_config_dict, tmp_path):
    assert parse_sweep("train_fraction=0.02,0.5,1") == ("train_fraction", [0.02, 0.5, 1.0])
    assert parse_sweep("cold_items=0,5") == ("cold_items", [0, 5])
    with pytest.raises(ValueError, match="sweep: 'epochz=1,2' is not KEY=V1,V2,... over a benchmark option"):
        parse_sweep("epochz=1,2")
    with pytest.raises(ValueError, match="sweep: cold_users value '1.5' is not an integer"):
        parse_sweep("cold_users=1,1.5")
    with pytest.raises(ValueError, match="sweep: train_fraction needs distinct values"):
        parse_sweep("train_fraction=0.5,0.5")

    def runner(spec, log_path):
        raise AssertionError("no model may run")

    with pytest.raises(
        ValueError,
        match=r"train_fraction: expected a number in \(0, 1\] \(the share of training interactions kept\), got 2.0",
    ):
        run_sweep("train_fraction", [0.5, 2.0], "toy", ["Pop"], "full", None, bench_overrides(toy_config_dict),
                  str(tmp_path / "s"), log=lambda m: None, runner=runner)  # fmt: skip
    with pytest.raises(SystemExit, match="recbole-llmgen benchmark: sweep: 'seed=1,2' is not KEY=V1"):
        main(["benchmark", "--dataset", "toy", "--sweep", "seed=1,2", "--out", str(tmp_path / "t")])
