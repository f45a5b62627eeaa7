"""Every way a RecBole user runs a model: RecBole's own functions, ours, the CLI."""

import json
import subprocess
import sys

import pytest
import torch


def test_recbole_run_recbole_and_load_data_and_model(toy_config_dict, tmp_path):
    from recbole.quick_start import load_data_and_model, run_recbole

    config = dict(toy_config_dict, checkpoint_dir=str(tmp_path / "saved"))
    result = run_recbole(model="LLMGen", dataset="toy", config_dict=config)
    assert set(result) == {"best_valid_score", "valid_score_bigger", "best_valid_result", "test_result"}
    (checkpoint,) = list((tmp_path / "saved").glob("LLMGen-*.pth"))
    assert checkpoint.stat().st_size < 200_000  # config only: never the frozen LLM
    assert not list((tmp_path / "saved").glob(".tmp-*"))

    conf, model, dataset, train_data, valid_data, test_data = load_data_and_model(str(checkpoint))
    assert type(model).__name__ == "LLMGen" and conf["num_candidates"] == 5
    # the rebuilt model scores exactly like a freshly built one
    from conftest import build

    _, fresh, *_ = build(config)
    batch = next(iter(test_data))[0]
    assert torch.allclose(model.full_sort_predict(batch), fresh.full_sort_predict(batch))
    # RecBole's test result is the ranking metric of the reloaded model's scores, computed by hand
    from conftest import hand_metrics

    expected = hand_metrics(model, test_data)
    assert {k: round(float(result["test_result"][k]), 4) for k in expected} == expected


def test_zero_shot_trains_nothing(toy_config_dict, monkeypatch):
    from recbole_llmgen import LLMGen

    def fail(*args, **kwargs):
        raise AssertionError("calculate_loss must not run in zero-shot")

    monkeypatch.setattr(LLMGen, "calculate_loss", fail)
    from recbole.quick_start import run_recbole

    run_recbole(model="LLMGen", dataset="toy", config_dict=dict(toy_config_dict, epochs=3), saved=False)


def test_sampled_protocol_uni19(toy_config_dict):
    """uni19 through our run_recbole runs; LLMGen's sampled metrics are exactly NDCG@10/Hit@10 by
    hand from its predict scores over the same sampled rows (RecBole samples when it iterates:
    the same seed before each pass gives the same rows)."""
    from conftest import build, sampled_metrics
    from recbole.utils import init_seed

    from recbole_llmgen import run_recbole
    from recbole_llmgen.trainer import LLMGenTrainer

    config = dict(toy_config_dict, eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "uni19"})
    result = run_recbole(model="LLMGen", dataset="toy", config_dict=config, saved=False)
    assert set(result["test_result"]) >= {"ndcg@10", "hit@10"}
    config, model, _, _, test_data = build(config)
    init_seed(config["seed"], True)
    evaluated = LLMGenTrainer(config, model).evaluate(test_data, load_best_model=False)
    init_seed(config["seed"], True)
    assert {k: evaluated[k] for k in ("ndcg@10", "hit@10")} == sampled_metrics(model, test_data)
    assert len(next(iter(test_data))[0]) % 20 == 0  # each user's target and 19 sampled items


def test_our_run_recbole_runs_builtin_models(toy_root):
    from recbole_llmgen import run_recbole

    result = run_recbole(
        model="BPR",
        dataset="toy",
        config_dict={"data_path": str(toy_root), "epochs": 1, "show_progress": False, "state": "ERROR"},
    )
    assert "ndcg@10" in result["test_result"]


def test_our_run_recbole_names_unknown_models():
    from recbole_llmgen import run_recbole

    with pytest.raises(ValueError, match=r"Known models:.*BPR.*LLMGen"):
        run_recbole(model="GPT5Rec", dataset="ml-100k")


def test_default_data_path_is_datasets(tmp_path, toy_root, toy_config_dict):
    """Without data_path, datasets/ (relative to the working directory) is used."""
    from recbole_llmgen import run_recbole

    config = {k: v for k, v in toy_config_dict.items() if k != "data_path"}
    # toy_root is tmp_path/datasets and the test runs in tmp_path
    result = run_recbole(model="LLMGen", dataset="toy", config_dict=config, saved=False)
    assert "hit@10" in result["test_result"]


def test_cli_run_writes_json(toy_config_dict, tmp_path):
    out = tmp_path / "result.json"
    args = [f"--{k}={v}" for k, v in toy_config_dict.items()]
    cmd = [
        sys.executable,
        "-m",
        "recbole_llmgen",
        "run",
        "--model",
        "LLMGen",
        "--dataset",
        "toy",
        "--json",
        str(out),
        *args,
    ]
    completed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) == {"model", "dataset", "best_valid_result", "test_result", "seconds"}
    assert result["model"] == "LLMGen" and result["dataset"] == "toy"
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0


def test_cli_rejects_stray_arguments():
    from recbole_llmgen.cli import main

    with pytest.raises(SystemExit, match="--key=value"):
        main(["run", "--model", "Pop", "stray"])


def test_cli_overrides_are_typed():
    from recbole_llmgen.cli import parse_overrides

    assert parse_overrides(["--num_candidates=20", "--item_text_fields=[a, b]", "--x=[400,inf)", "--flag=True"]) == {
        "num_candidates": 20,
        "item_text_fields": ["a", "b"],
        "x": "[400,inf)",
        "flag": True,
    }


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "recbole-llmgen"]
    assert script.value == "recbole_llmgen.cli:main"


def test_cli_takes_model_and_dataset_from_config_files(tmp_path, toy_root, monkeypatch):
    """A yaml that names another model is not overridden by the command's defaults."""
    import yaml

    from recbole_llmgen import cli

    seen = {}

    def fake_run_recbole(model, dataset, config_file_list, config_dict, saved, **processes):
        seen.update(model=model, dataset=dataset)
        return {"best_valid_result": {}, "test_result": {}}

    monkeypatch.setattr("recbole_llmgen.quick_start.run_recbole", fake_run_recbole)
    path = tmp_path / "bpr.yaml"
    path.write_text(yaml.safe_dump({"model": "BPR", "dataset": "toy"}))
    assert cli.main(["run", "--config_files", str(path)]) == 0
    assert seen == {"model": "BPR", "dataset": "toy"}
    assert cli.main(["run"]) == 0
    assert seen == {"model": "LLMGen", "dataset": "ml-100k"}
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["run", "--config_files", str(tmp_path / "missing.yaml")])
