"""`recbole-llmgen tune`: RecBole's HyperTuning over a model's keys, trials kept, selection on valid."""

import json

import pandas as pd
import pytest
import yaml

from recbole_llmgen import benchmark
from recbole_llmgen.cli import main
from recbole_llmgen.tune import read_params_file, run_tune


def _common(toy_config_dict, **extra):
    return {"data_path": toy_config_dict["data_path"], "state": "ERROR", "epochs": 1, "show_progress": False, **extra}


def test_exhaustive_search_records_every_trial_and_selects_on_valid(toy_config_dict, tmp_path):
    params = tmp_path / "hp.txt"
    params.write_text("# BPR's size and step\nembedding_size choice [4,8]\nlearning_rate choice [0.01,0.001]\n")
    out = tmp_path / "tune"
    calls = []

    def runner(spec, log_path):
        calls.append(spec["config"])
        return benchmark.run_in_process(spec, log_path)

    messages = []
    rows = run_tune("BPR", "toy", str(params), "exhaustive", 100, None, _common(toy_config_dict), str(out),
                    log=messages.append, runner=runner)  # fmt: skip
    assert len(rows) == len(calls) == 4
    combos = {(r["param_embedding_size"], r["param_learning_rate"]) for r in rows}
    assert combos == {(e, lr) for e in (4, 8) for lr in (0.01, 0.001)}
    table = pd.read_csv(out / "tune.csv")
    assert len(table) == 4 and {"valid_ndcg@10", "test_ndcg@10", "seconds", "status"} <= set(table.columns)
    best = table.loc[table["best_valid_score"].idxmax()]
    chosen = yaml.safe_load((out / "best.yaml").read_text())
    assert chosen == {"embedding_size": int(best["param_embedding_size"]), "learning_rate": best["param_learning_rate"]}
    assert "trial 4 of 4" in messages[-1] and "best so far" in messages[-1]
    assert "*" in (out / "tune.md").read_text()

    calls.clear()
    again = run_tune("BPR", "toy", str(params), "exhaustive", 100, None, _common(toy_config_dict), str(out),
                     log=lambda m: None, runner=runner)  # fmt: skip
    assert not calls and all(r.get("reused") for r in again)  # finished trials are reused

    params.write_text("embedding_size choice [4]\nlearning_rate choice [0.01]\n")  # a smaller search, same OUT
    run_tune("BPR", "toy", str(params), "exhaustive", 100, None, _common(toy_config_dict), str(out),
             log=lambda m: None, runner=runner)  # fmt: skip
    table = pd.read_csv(out / "tune.csv")
    assert len(table) == 4 and (table["trial"] == "earlier").sum() == 3  # nothing written before is lost


def test_a_failing_trial_is_recorded_and_the_search_goes_on(toy_config_dict, tmp_path):
    params = tmp_path / "hp.txt"
    params.write_text("embedding_size choice [4,8,16]\n")

    def runner(spec, log_path):
        if spec["config"]["embedding_size"] == 8:
            return {"model": "BPR", "status": "failed", "error": "RuntimeError: out of memory"}
        return benchmark.run_in_process(spec, log_path)

    rows = run_tune("BPR", "toy", str(params), "exhaustive", 100, None, _common(toy_config_dict), str(tmp_path / "t"),
                    log=lambda m: None, runner=runner)  # fmt: skip
    assert [r["status"] for r in sorted(rows, key=lambda r: r["param_embedding_size"])] == ["ok", "failed", "ok"]
    assert yaml.safe_load((tmp_path / "t" / "best.yaml").read_text())["embedding_size"] in (4, 16)


def test_cli_tunes_llmgen_in_processes(toy_config_dict, tmp_path, capsys):
    params = tmp_path / "hp.txt"
    params.write_text("num_candidates choice [3,5]\n")
    out = tmp_path / "cli"
    code = main([
        "tune", "--model", "LLMGen", "--dataset", "toy", "--params_file", str(params), "--out", str(out),
        f"--data_path={toy_config_dict['data_path']}", f"--llm_path={toy_config_dict['llm_path']}",
        f"--llm_cache_dir={toy_config_dict['llm_cache_dir']}", "--state=ERROR",
    ])  # fmt: skip
    assert code == 0
    table = pd.read_csv(out / "tune.csv")
    assert sorted(table["param_num_candidates"]) == [3, 5] and (table["status"] == "ok").all()
    assert table["valid_ndcg@10"].notna().all()  # zero-shot trials are validated: selection needs it
    assert "tune.csv" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("num_candidates [5,10]\n", r"params_file: line 1 'num_candidates \[5,10\]' is not 'name kind values'"),
        ("num_candidates pick [5,10]\n", "kind one of: choice"),
        ("num_candidates choice 5\n", r"choice takes \[a,b,...\], got '5'"),
        ("learning_rate uniform 0.1\n", "uniform takes low,high"),
        ("# nothing\n", "has no 'name kind values' line"),
    ],
)
def test_bad_params_files_are_named(tmp_path, text, message):
    path = tmp_path / "hp.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_params_file(str(path))


def test_bad_search_settings_are_named(toy_config_dict, tmp_path):
    path = tmp_path / "hp.txt"
    path.write_text("num_candidatez choice [5,10]\n")
    common = _common(toy_config_dict, llm_path=toy_config_dict["llm_path"])
    with pytest.raises(ValueError, match=r"algo: 'grid' is not allowed; choose one of exhaustive, random, bayes"):
        run_tune("LLMGen", "toy", str(path), "grid", 10, None, common, str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"params_file: \['num_candidatez'\] are not keys that LLMGen or RecBole know"):
        run_tune("LLMGen", "toy", str(path), "random", 10, None, common, str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="params_file: 'nope.txt' does not exist"):
        run_tune("LLMGen", "toy", "nope.txt", "random", 10, None, common, str(tmp_path / "o"))
    assert json.dumps(common)  # the overrides were not changed
