"""Per-user metrics, bootstrap intervals and `recbole-llmgen compare`."""

import os

import numpy as np
import pandas as pd
import pytest
from conftest import bench_overrides

from recbole_llmgen import benchmark, per_user
from recbole_llmgen.cli import main


def test_bootstrap_is_seeded_and_a_model_against_itself_differs_by_exactly_zero():
    values = np.random.default_rng(0).random(300)
    low, high = per_user.bootstrap_interval(values)
    assert low < values.mean() < high
    assert (low, high) == per_user.bootstrap_interval(values)  # same seed, same interval
    assert per_user.paired_difference(values, values) == (0.0, 0.0, 0.0)
    shifted = values + 0.1  # a clear, constant gain is supported by every resample
    mean, low, high = per_user.paired_difference(shifted, values)
    assert mean == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)
    noisy = np.random.default_rng(1).random(300)
    mean, low, high = per_user.paired_difference(noisy, values)
    assert low < mean < high
    with pytest.raises(ValueError, match="pair them by user first"):
        per_user.paired_difference(values, values[:10])


@pytest.mark.parametrize("protocol", ["full", "uni19"])
def test_per_user_values_reproduce_recbole_and_give_intervals(toy_config_dict, tmp_path, protocol):
    out = str(tmp_path / "bench")
    rows = benchmark.run_benchmark("toy", ["Pop", "SASRec", "LLMGen"], protocol, None, bench_overrides(toy_config_dict),
                                   out, log=lambda m: None, runner=benchmark.run_in_process)  # fmt: skip
    assert [r["model"] for r in rows] == ["Pop", "SASRec", "TextRetriever", "LLMGen"]
    assert [r["status"] for r in rows] == ["ok"] * 4
    users = None
    for row in rows:
        frame = per_user.read_users(os.path.join(out, "runs", row["model"]))
        assert row["users"] == len(frame) > 0
        users = users if users is not None else frame["targets"].to_dict()
        assert frame["targets"].to_dict() == users  # the same users and targets for every model and loader kind
        assert all(t for t in frame["targets"])
        for metric in ("ndcg@10", "hit@10", "mrr@10", "recall@10"):
            assert round(frame[metric].mean(), 4) == row[f"test_{metric}"]  # RecBole's own average
        assert row["test_ndcg@10_low"] <= row["test_ndcg@10"] <= row["test_ndcg@10_high"]
    llm = rows[-1]
    best = benchmark.best_candidate(rows[:3])  # the classic models and the text retriever, by valid
    assert llm["compared_to"] == best["model"]
    assert abs(llm["diff_ndcg@10"] - (llm["test_ndcg@10"] - best["test_ndcg@10"])) < 2e-4  # paired, same users
    assert llm["diff_ndcg@10_low"] <= llm["diff_ndcg@10"] <= llm["diff_ndcg@10_high"]
    markdown = open(os.path.join(out, "benchmark.md"), encoding="utf-8").read()
    assert f"vs {best['model']}" in markdown and "95% bootstrap interval" in markdown
    table = pd.read_csv(os.path.join(out, "benchmark.csv"))
    assert {"users", "test_ndcg@10_low", "test_hit@10_high", "diff_ndcg@10_low"} <= set(table.columns)


def test_compare_and_its_named_errors(tmp_path, capsys):
    rng = np.random.default_rng(3)
    users = [f"u{i}" for i in range(50)]
    base = rng.random(50)
    for name, values in (("A", base + 0.2), ("B", base)):
        per_user.write_users(str(tmp_path / f"{name}{per_user.SUFFIX}"), users, "test", {"ndcg@10": values})
    assert main(["compare", str(tmp_path / "A"), str(tmp_path / "B"), "--metrics", "ndcg@10"]) == 0
    printed = capsys.readouterr().out
    assert "on 50 users" in printed and "+0.2000" in printed and "excludes 0" in printed
    assert main(["compare", str(tmp_path / "B"), str(tmp_path / "B"), "--metrics", "ndcg@10"]) == 0
    assert "+0.0000, 95% interval [+0.0000, +0.0000] (includes 0" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="metric: 'hit@10' was not computed"):
        main(["compare", str(tmp_path / "A"), str(tmp_path / "B"), "--metrics", "hit@10"])
    per_user.write_users(str(tmp_path / f"C{per_user.SUFFIX}"), users[:40], "test", {"ndcg@10": base[:40]})
    with pytest.raises(SystemExit, match="evaluated different users .*10 only in A"):
        main(["compare", str(tmp_path / "A"), str(tmp_path / "C")])
    with pytest.raises(SystemExit, match="does not exist; a benchmark run writes"):
        main(["compare", str(tmp_path / "A"), str(tmp_path / "missing")])


def test_rows_on_different_users_are_an_error(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    rows = []
    for model, users in (("Pop", ["u1", "u2", "u3"]), ("BPR", ["u1", "u2"])):
        per_user.write_users(str(runs / f"{model}{per_user.SUFFIX}"), users, "test", {"ndcg@10": np.ones(len(users))})
        rows.append({"model": model, "status": "ok"})
    with pytest.raises(ValueError, match="Pop and BPR evaluated different users"):
        benchmark.add_intervals(rows, str(tmp_path))


def test_same_users_on_other_targets_are_an_error(tmp_path):
    users = ["u1", "u2"]
    for name, targets in (("A", ["i1", "i2"]), ("B", ["i1", "i9"])):
        path = str(tmp_path / f"{name}{per_user.SUFFIX}")
        per_user.write_users(path, users, "test", {"ndcg@10": np.ones(2)}, targets)
    a, b = per_user.read_users(str(tmp_path / "A")), per_user.read_users(str(tmp_path / "B"))
    with pytest.raises(
        ValueError, match=r"same users on different target items \(1 users, e.g. 'u2': 'i2' against 'i9'"
    ):
        per_user.aligned(a, b, "ndcg@10")
    with pytest.raises(ValueError, match="metric: 'targets' was not computed"):
        per_user.aligned(a, a, "targets")
