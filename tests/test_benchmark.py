"""`recbole-llmgen benchmark`: one table, every model through RecBole, failures kept, reruns reuse."""

import csv
import json
import os

import pytest
from conftest import bench_overrides

from recbole_llmgen import benchmark
from recbole_llmgen.cli import main
from recbole_llmgen.llm import describe_machine


def test_benchmark_writes_table_plot_and_reuses_rows(toy_config_dict, tmp_path):
    out = str(tmp_path / "bench")
    models = ["Pop", "BPR", "SASRec", "LLMGen"]
    broken = bench_overrides(toy_config_dict, llm_path=str(tmp_path / "no-such-model"))
    rows = benchmark.run_benchmark("toy", models, "full", None, broken, out, log=lambda m: None,
                                   runner=benchmark.run_in_process)  # fmt: skip
    # the text retriever, a row of its own, runs before LLMGen: a candidate source to choose from
    assert [r["model"] for r in rows] == ["Pop", "BPR", "SASRec", "TextRetriever", "LLMGen"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed", "failed"]
    assert "llm_path" in rows[-1]["error"]
    for name in ("benchmark.csv", "benchmark.md", "benchmark.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "benchmark.csv"), encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["model"] for r in table] == ["Pop", "BPR", "SASRec", "TextRetriever", "LLMGen"]
    for r in table[:3]:  # each row's metric is the mean of its per-user file (one line per test user)
        with open(os.path.join(out, "runs", f"{r['model']}.users.csv"), encoding="utf-8") as f:
            users = list(csv.DictReader(f))
        assert len(users) == 8 and float(r["test_ndcg@10"]) == round(sum(float(u["ndcg@10"]) for u in users) / 8, 4)
    markdown = open(os.path.join(out, "benchmark.md"), encoding="utf-8").read()
    assert markdown.count("\n| ") == 6 and "failed: " in markdown

    # second run: the three classic models are reused, only the LLM rows run (now with a model)
    seen = []

    def runner(spec, log_path):
        seen.append(spec.get("name", spec["model"]))
        return benchmark.run_in_process(spec, log_path)

    rows2 = benchmark.run_benchmark("toy", models, "full", None, bench_overrides(toy_config_dict), out,
                                    log=lambda m: None, runner=runner)  # fmt: skip
    assert seen == ["TextRetriever", "LLMGen"]
    assert [r["status"] for r in rows2] == ["ok"] * 5
    assert rows2[:3] == rows[:3]
    best = max(rows2[:4], key=lambda r: r["best_valid_score"])  # a tie would go to the classic model
    expected = "text" if best["model"] == "TextRetriever" else best["model_file"]
    assert rows2[4]["candidate_source"] == expected  # reranks the best candidate source on valid
    assert rows2[4]["trainable_parameters"] == 0 and rows2[4]["total_parameters"] > 0
    assert "valid_ndcg@10" not in rows2[4]  # zero-shot: the valid split is skipped unless llm_valid
    # every row says where it was measured; the LLM row with its weights' dtype (auto: by the CPU)
    machine = describe_machine("cpu")
    assert {r["machine"] for r in rows2} == {machine}
    assert rows2[4]["llm_dtype"] in ("float32", "bfloat16") and rows2[0]["llm_dtype"] == ""
    markdown = open(os.path.join(out, "benchmark.md"), encoding="utf-8").read()
    assert f"Machine: {machine}; LLM weights {rows2[4]['llm_dtype']}." in markdown


def test_rows_reused_from_another_machine_are_attributed_to_it():
    rows = [
        {"model": "BPR", "machine": "Intel Xeon, 2 cores, amx_bf16, native bf16", "llm_dtype": ""},
        {"model": "LLMGen", "machine": "AMD EPYC, 2 cores, avx2, no native bf16", "llm_dtype": "float32"},
        {"model": "Pop"},
    ]  # fmt: skip  (a row written before rows said where they ran)
    line = benchmark.machine_line(rows)
    assert line.startswith("Machines (rows reused from earlier runs keep theirs): ")
    assert "Intel Xeon, 2 cores, amx_bf16, native bf16: BPR;" in line
    assert "AMD EPYC, 2 cores, avx2, no native bf16: LLMGen (LLM weights float32)" in line
    assert line.endswith("not recorded: Pop.\n\n")
    assert benchmark.machine_line([{"model": "Pop"}]) == ""


def test_the_text_retriever_is_chosen_when_it_validates_best(toy_config_dict, tmp_path):
    """LLMGen's default candidate source is chosen on the valid split among the classic models and
    the text retriever; the retriever's row is the text ranking alone (no LLM), a baseline."""

    def runner(spec, log_path):
        row = benchmark.run_in_process(spec, log_path)
        if spec["model"] != "LLMGen":  # classic models that validate worse than the text retriever
            row["best_valid_score"] = -1.0
        return row

    out = str(tmp_path / "bench")
    rows = benchmark.run_benchmark("toy", ["Pop", "BPR", "LLMGen"], "full", None, bench_overrides(toy_config_dict),
                                   out, log=lambda m: None, runner=runner)  # fmt: skip
    by_model = {r["model"]: r for r in rows}
    text, llm = by_model["TextRetriever"], by_model["LLMGen"]
    assert [r["model"] for r in rows] == ["Pop", "BPR", "TextRetriever", "LLMGen"]
    assert text["status"] == "ok" and text["best_valid_score"] is not None and text["variant"] == ""
    assert text["candidate_source"] == "text" and text["fusion_weight"] == 0.0 and text["trainable_parameters"] == 0
    assert llm["candidate_source"] == "text" and llm["compared_to"] == "TextRetriever"
    labels = [benchmark.row_label(r) for r in rows]
    assert "TextRetriever (sentence-encoder similarity to the history, no LLM)" in labels
    assert "reranks the text retriever's top" in benchmark.row_label(llm)
    assert os.path.isfile(os.path.join(out, "runs", "TextRetriever.users.csv"))
    # a candidate source the user sets: no retriever row, no choice; the length penalty chosen on valid is said
    rows = benchmark.run_benchmark("toy", ["Pop", "LLMGen"], "full", None,
                                   bench_overrides(toy_config_dict, candidate_source="pop", length_penalty="auto"),
                                   str(tmp_path / "set"), log=lambda m: None, runner=benchmark.run_in_process)  # fmt: skip
    assert [r["model"] for r in rows] == ["Pop", "LLMGen"] and rows[1]["candidate_source"] == "pop"
    assert rows[1]["length_penalty_auto"] and rows[1]["length_penalty"] in (1.0, 0.75, 0.5, 0.25, 0.0)
    assert f"length penalty {rows[1]['length_penalty']:g} chosen on valid" in benchmark.row_label(rows[1])
    assert "length_penalty" not in rows[0] and "length penalty" not in benchmark.row_label(llm)


def test_uni19_protocol_and_config_changes_rerun(toy_config_dict, tmp_path):
    out = str(tmp_path / "bench")
    run = lambda **extra: benchmark.run_benchmark(  # noqa: E731
        "toy", ["Pop"], "uni19", None, bench_overrides(toy_config_dict, **extra), out,
        log=lambda m: None, runner=benchmark.run_in_process)  # fmt: skip
    first = run()
    assert first[0]["status"] == "ok" and first[0]["test_hit@10"] > first[0]["test_ndcg@10"] > 0
    assert run()[0] == first[0]
    assert run(seed=7)[0]["hash"] != first[0]["hash"]


def test_bad_arguments_are_named(toy_config_dict, tmp_path):
    with pytest.raises(ValueError, match="protocol: 'uni7' is not allowed; choose one of full, uni19, uni100"):
        benchmark.run_benchmark("toy", ["Pop"], "uni7", None, {}, str(tmp_path))
    with pytest.raises(ValueError, match=r"models: \['Nope'\] are not RecBole or plugin models"):
        benchmark.run_benchmark("toy", ["Nope"], "full", None, {}, str(tmp_path))


def test_cli_runs_each_model_in_its_own_process(toy_config_dict, tmp_path, capsys):
    out = tmp_path / "cli"
    args = [f"--{k}={v}" for k, v in bench_overrides(toy_config_dict, llm_path=str(tmp_path / "missing")).items()]
    code = main(["benchmark", "--dataset", "toy", "--models", "Pop,LLMGen", "--out", str(out), *args])
    assert code == 1  # LLMGen failed
    rows = [json.load(open(out / "runs" / f"{m}.json", encoding="utf-8")) for m in ("Pop", "LLMGen")]
    assert rows[0]["status"] == "ok" and rows[0]["peak_memory_mb"] > 0
    assert rows[-1]["status"] == "failed" and "llm_path" in rows[-1]["error"]
    assert "Traceback" in (out / "runs" / "LLMGen.log").read_text()
    assert "| Pop |" in capsys.readouterr().out


def test_llmgen_in_two_processes_gives_the_same_row(toy_config_dict, tmp_path):
    out = str(tmp_path / "bench")
    run = lambda nproc, **extra: benchmark.run_benchmark(  # noqa: E731
        "toy", ["Pop", "LLMGen"], "full", None, bench_overrides(toy_config_dict, **extra), out,
        log=lambda m: None, llm_nproc=nproc)  # fmt: skip
    users = os.path.join(out, "runs", "LLMGen.users.csv")
    one = run(1)[-1]
    users_one = open(users, encoding="utf-8").read()
    os.remove(users)
    two = run(2)[-1]  # Pop and the text retriever reused, LLMGen rerun in two processes
    assert open(users, encoding="utf-8").read() == users_one  # written once (rank 0), every user, same values
    assert two["status"] == "ok" and two["processes"] == 2 and one["processes"] == 1
    assert {k: v for k, v in two.items() if k.startswith("test_")} == {
        k: v for k, v in one.items() if k.startswith("test_")
    }
    assert "2 processes" in open(os.path.join(out, "benchmark.md"), encoding="utf-8").read()
    failed = run(2, llm_path=str(tmp_path / "missing"))[-1]
    assert (
        failed["status"] == "failed" and failed["error"].startswith("2 processes: ") and "llm_path" in failed["error"]
    )
    with pytest.raises(ValueError, match="llm_nproc: expected a number of processes >= 1, got 0"):
        run(0)


def test_rows_say_how_each_model_was_trained(toy_config_dict, tmp_path):
    out = str(tmp_path / "bench")
    overrides = bench_overrides(toy_config_dict, epochs=30, stopping_step=2)
    overrides.pop("epochs")  # the defaults' caps (BPR 300, SASRec 200), stopping after 2 + 1 epochs without a gain
    rows = benchmark.run_benchmark("toy", ["Pop", "BPR", "SASRec", "LLMGen"], "full", None,
                                   overrides, out, log=lambda m: None,
                                   runner=benchmark.run_in_process)  # fmt: skip
    by_model = {r["model"]: r for r in rows}
    bpr = by_model["BPR"]
    assert bpr["epoch_cap"] == 300 and bpr["stopped_by"] == "validation"  # early stopping ended it, not the cap
    # RecBole stops at the (stopping_step + 1)-th epoch without a better valid score after the best one
    assert bpr["epochs_trained"] == bpr["best_epoch"] + 1 + 3
    sasrec = by_model["SASRec"]  # trained until validation stops improving, as every classic row
    assert sasrec["epoch_cap"] == 200 and sasrec["stopped_by"] == "validation"
    assert sasrec["epochs_trained"] == sasrec["best_epoch"] + 1 + 3
    llm = by_model["LLMGen"]
    assert llm["epochs_trained"] == 0 and llm["stopped_by"] == "none"
    assert by_model["Pop"]["stopped_by"] == "one pass" and by_model["Pop"]["epoch_cap"] == 1
    markdown = open(os.path.join(out, "benchmark.md"), encoding="utf-8").read()
    assert "| SASRec |" in markdown and "| BPR |" in markdown
    assert (
        benchmark.row_label({"model": "SASRec", "stopped_by": "cap", "epoch_cap": 3}) == "SASRec (capped at 3 epochs)"
    )
    assert f"{bpr['epochs_trained']} ({bpr['best_epoch'] + 1}) / validation (cap 300)" in markdown
    assert "0 / zero-shot" in markdown


def test_training_record():
    class Fake:
        train_loss_dict = {0: 1.0, 1: 0.5, 2: 0.4}
        valid_metric_bigger = True

    from recbole.utils import ModelType

    config = {"epochs": 3, "MODEL_TYPE": ModelType.GENERAL}
    assert benchmark.training_record(Fake(), config, [(0, 0.1), (1, 0.3), (2, 0.3)]) == {
        "epochs_trained": 3,
        "epoch_cap": 3,
        "best_epoch": 2,  # a tie replaces the best in RecBole's early stopping (>=): the last one
        "stopped_by": "cap",
    }
    longer = {**config, "epochs": 10}
    assert benchmark.training_record(Fake(), longer, [(0, 0.1), (1, 0.3), (2, 0.2)])["stopped_by"] == "validation"
    traditional = {**config, "MODEL_TYPE": ModelType.TRADITIONAL}
    assert benchmark.training_record(Fake(), traditional, [(0, 0.1)])["stopped_by"] == "one pass"
    Fake.valid_metric_bigger = False  # a loss-like metric
    assert benchmark.training_record(Fake(), config, [(0, 0.3), (1, 0.1), (2, 0.2)])["best_epoch"] == 1
    Fake.train_loss_dict = {}
    assert benchmark.training_record(Fake(), config, [])["stopped_by"] == "none"


@pytest.mark.parametrize("key", ["epochs", "stopping_step"])
def test_bad_epoch_settings_are_named(toy_config_dict, tmp_path, key):
    with pytest.raises(ValueError, match=f"{key}: expected an integer >= 1"):
        benchmark.run_benchmark("toy", ["Pop"], "full", None, bench_overrides(toy_config_dict, **{key: 0}),
                                str(tmp_path), log=lambda m: None, runner=benchmark.run_in_process)  # fmt: skip


def test_finetune_config_gives_llm_only_and_fused_rows(toy_config_dict, tmp_path):
    """The documented fine-tuning file, scoped to LLMGen: classic models keep the default run's
    settings; one LLMGen training gives an "LLM only" and a "fused" row, each with its own
    per-user file, interval and paired difference."""
    from pathlib import Path

    config_file = str(Path(__file__).parents[1] / "configs" / "llmgen_ml-100k_finetune.yaml")
    out = tmp_path / "bench"
    overrides = bench_overrides(toy_config_dict, max_history_items=4, llm_dtype="float32", item_text_template="{title}")
    del overrides["epochs"]  # BPR keeps the default run's cap
    rows = benchmark.run_benchmark(
        "toy",
        ["Pop", "BPR", "LLMGen"],
        config_files=[config_file],
        overrides=overrides,
        out=str(out),
        runner=benchmark.run_in_process,
        log=lambda _: None,
    )
    row_label = benchmark.row_label
    by_label = {row_label(r): r for r in rows}
    bpr = next(r for r in rows if r["model"] == "BPR")
    assert bpr["epoch_cap"] == 300  # the file's epochs: 2 is LLMGen's only
    llm = [r for r in rows if r["model"] == "LLMGen"]
    assert [r.get("variant") for r in llm] == ["fused", "LLM only"], by_label
    fused, alone = llm
    assert fused["status"] == alone["status"] == "ok"
    assert fused["trainable_parameters"] > 0 and fused["epoch_cap"] == fused["epochs_trained"] == 2
    assert fused["best_epoch"] in (0, 1)  # RecBole keeps the best validation's checkpoint
    curve = fused["valid_curve"]  # the learning curve, one point per epoch, fused and LLM alone
    assert [p["epoch"] for p in curve] == list(range(fused["epochs_trained"]))
    assert all(p["fused_ndcg@10"] is not None and p["llm_alone_ndcg@10"] is not None for p in curve)
    assert curve[fused["best_epoch"]]["valid"] == fused["best_valid_score"]
    assert os.path.getsize(out / "learning_curve.png") > 1000
    assert 0.0 <= fused["fusion_weight"] <= 1.0 and alone["fusion_weight"] == 1.0
    assert "fine-tuned" in row_label(fused) and "LLM only" in row_label(alone) and "fused" in row_label(fused)
    for row in llm:
        assert row["users"] == bpr["users"] and row["compared_to"] == "BPR"
        assert row["test_ndcg@10"] is not None and row["valid_ndcg@10"] is not None
    assert os.path.isfile(out / "runs" / "LLMGen.llm-only.users.csv")
    table = (out / "benchmark.md").read_text()
    assert "LLM only" in table and "fused, LLM weight" in table


def test_a_models_hash_ignores_other_models_sections(tmp_path):
    """Editing LLMGen's section of a shared config file reruns LLMGen, not the classic models."""
    path = tmp_path / "shared.yaml"

    def hashes(text):
        path.write_text(text)
        return {
            m: benchmark.run_hash({"model": m, "dataset": "toy", "config": {}, "config_files": [str(path)]})
            for m in ("BPR", "LLMGen")
        }

    first = hashes("topk: [10]\nLLMGen:\n  epochs: 1\n")
    second = hashes("topk: [10]\nLLMGen:\n  epochs: 2\n")
    third = hashes("topk: [5]\nLLMGen:\n  epochs: 2\n")
    assert first["BPR"] == second["BPR"] and first["LLMGen"] != second["LLMGen"]
    assert third["BPR"] != second["BPR"] and third["LLMGen"] != second["LLMGen"]
    assert benchmark.file_keys([str(path)], "BPR") == {"topk"}
    assert benchmark.file_keys([str(path)], "LLMGen") == {"topk", "epochs"}
    # a file that sets nothing for BPR (only LLMGen's section) leaves BPR's run as without it: reused
    only_llmgen = hashes("LLMGen:\n  epochs: 2\n")
    alone = benchmark.run_hash({"model": "BPR", "dataset": "toy", "config": {}, "config_files": None})
    assert only_llmgen["BPR"] == alone and only_llmgen["LLMGen"] != alone


def test_filtered_data_gives_an_llmgen_row_over_the_classic_models_candidates(toy_config_dict, tmp_path):
    """RecBole's filtering with LLMGen's item file: the classic model's checkpoint maps items
    differently, LLMGen reranks its candidates by token, and every row evaluates the same users."""
    overrides = bench_overrides(toy_config_dict, item_inter_num_interval="[2,inf)", user_inter_num_interval="[11,inf)")
    rows = benchmark.run_benchmark(
        "toy", ["Pop", "LLMGen"], "full", None, overrides, str(tmp_path / "bench"),
        log=lambda m: None, runner=benchmark.run_in_process)  # fmt: skip
    pop, llm = rows[0], rows[-1]
    assert pop["status"] == llm["status"] == "ok", llm.get("error")
    best = benchmark.best_candidate(rows[:-1])  # Pop or the text retriever, whichever validates better
    assert llm["candidate_source"] == benchmark.candidate_source_of(best) and llm["users"] == pop["users"] == 7


def test_an_error_without_text_still_gives_a_line():
    assert benchmark.error_line(RuntimeError()) == "RuntimeError"
    assert benchmark.error_line(ValueError("first\nlast")) == "last"


def test_the_llm_only_row_restores_the_fusion_weight_when_it_fails():
    from types import SimpleNamespace

    def evaluate(*args, **kwargs):
        raise RuntimeError("out of memory")

    trainer = SimpleNamespace(evaluate=evaluate, evaluator=SimpleNamespace(evaluate=lambda struct: {}), config={})
    model = SimpleNamespace(fusion_weight=0.3)
    with pytest.raises(RuntimeError, match="out of memory"):
        benchmark.llm_only_variant({}, trainer, model, None, [])
    assert model.fusion_weight == 0.3


def test_regime_data_raises_what_is_not_a_missing_regime(toy_config_dict, tmp_path, monkeypatch):
    from recbole_llmgen.regime import Regime, RegimeUnavailable

    overrides = bench_overrides(toy_config_dict)

    def broken(*args):
        raise ValueError("a real defect")

    monkeypatch.setattr(benchmark.plan, "prepare_regime", broken)
    with pytest.raises(ValueError, match="a real defect"):
        benchmark.regime_data(Regime(), "toy", overrides, None, str(tmp_path / "out"))

    def unavailable(*args):
        raise RegimeUnavailable("TIME_FIELD: a data regime needs the time column")

    monkeypatch.setattr(benchmark.plan, "prepare_regime", unavailable)
    assert benchmark.regime_data(Regime(), "toy", overrides, None, str(tmp_path / "out")) == (None, None)


def test_every_llmgen_label_says_how_the_row_ranked():
    row = {"model": "LLMGen", "trainable_parameters": 0, "num_candidates": 20}
    bpr = "/out/saved/BPR-Dec-02-2026_07-00-00.pth"
    assert "generates from the catalogue, no candidate model" in benchmark.row_label(
        {**row, "score_method": "generate", "candidate_source": "none"}
    )
    assert "generates, fused with BPR's score of each item" in benchmark.row_label(
        {**row, "score_method": "generate", "candidate_source": bpr, "variant": "fused", "fusion_weight": 0.3}
    )
    assert "generates from the catalogue, BPR below the generated items" in benchmark.row_label(
        {**row, "score_method": "generate", "candidate_source": bpr}
    )
    label = benchmark.row_label({**row, "score_method": "likelihood", "candidate_source": bpr})
    assert "reranks BPR's top 20" in label and "generates" not in label
    assert "reranks the text retriever's top 20" in benchmark.row_label(
        {**row, "score_method": "likelihood", "candidate_source": "text"}
    )


def test_a_candidate_source_in_a_config_file_is_kept(toy_config_dict, tmp_path):
    """The benchmark hands LLMGen the best classic model's file unless the user named a candidate
    source, on the command line or in a config file (``candidate_source: none`` included)."""
    path = tmp_path / "generate.yaml"
    path.write_text("LLMGen:\n  candidate_source: none\n  score_method: generate\n", encoding="utf-8")
    specs = {}

    def runner(spec, log_path):
        specs[spec["model"]] = spec
        return {"model": spec["model"], "status": "ok", "model_file": f"/saved/{spec['model']}-x.pth",
                "best_valid_score": 0.1, "valid_ndcg@10": 0.1, "test_ndcg@10": 0.1}  # fmt: skip

    for files, expected in (([str(path)], None), (None, "/saved/Pop-x.pth")):
        benchmark.run_benchmark("toy", ["Pop", "LLMGen"], "full", files, bench_overrides(toy_config_dict),
                                str(tmp_path / f"out-{bool(files)}"), log=lambda m: None, runner=runner)  # fmt: skip
        assert specs["LLMGen"]["config"].get("candidate_source") == expected


def test_valid_curve_gives_fused_and_llm_alone_per_epoch_and_plots_it(tmp_path):
    class Fake:
        train_loss_dict = {0: 9.0, 1: 7.5}
        fusion_weights = [0.3, 0.5]
        fusion_history = [
            {w: {"ndcg@10": 0.01 * (1 + w), "mrr@10": 0.1} for w in (0.0, 0.3, 1.0)},
            {w: {"ndcg@10": 0.02 * (1 + w), "mrr@10": 0.2} for w in (0.0, 0.5, 1.0)},
        ]

    curve = benchmark.valid_curve(Fake(), [(0, 0.1), (1, 0.2)])
    assert curve == [
        {"epoch": 0, "valid": 0.1, "train_loss": 9.0, "fusion_weight": 0.3, "fused_ndcg@10": 0.013,
         "llm_alone_ndcg@10": 0.02},
        {"epoch": 1, "valid": 0.2, "train_loss": 7.5, "fusion_weight": 0.5, "fused_ndcg@10": 0.03,
         "llm_alone_ndcg@10": 0.04},
    ]  # fmt: skip
    Fake.fusion_history = []  # no fusion: the valid metric only
    assert benchmark.valid_curve(Fake(), [(0, 0.1)]) == [{"epoch": 0, "valid": 0.1, "train_loss": 9.0}]
    row = {"model": "LLMGen", "status": "ok", "epochs_trained": 2, "best_epoch": 1, "valid_curve": curve,
           "valid_metric": "MRR@10", "train_mode": "lora"}  # fmt: skip
    path = tmp_path / "curve.png"
    benchmark.plot_curves([{"model": "BPR", "valid_curve": curve}, row], str(path))
    assert path.stat().st_size > 1000
    benchmark.plot_curves([{**row, "epochs_trained": 0}], str(tmp_path / "none.png"))  # zero-shot: no plot
    assert not (tmp_path / "none.png").exists()


def test_eval_users_evaluates_a_seeded_sample_with_the_full_runs_metrics(toy_config_dict, tmp_path):
    """A sample of test users: the same users for every model and both splits, each user's metrics
    exactly as in the full run (training uses all data), the row's metric their mean."""
    from recbole_llmgen import per_user

    # the candidate source fixed: by default it is the best classic model on the valid split, which a
    # sample of valid users may choose differently (model selection is the one thing a sample changes)
    overrides = bench_overrides(toy_config_dict, candidate_source="pop")
    models = ["Pop", "BPR", "LLMGen"]

    def run(out, **options):
        return benchmark.run_benchmark("toy", models, "full", None, dict(overrides), str(tmp_path / out),
                                       log=lambda m: None, runner=benchmark.run_in_process, **options)  # fmt: skip

    full = run("full")
    sampled = run("sampled", eval_users=3)
    for model in models:
        whole = per_user.read_users(str(tmp_path / "full" / "runs" / model))
        part = per_user.read_users(str(tmp_path / "sampled" / "runs" / model))
        assert len(part) == 3 and set(part.index) < set(whole.index), model
        for metric in ("ndcg@10", "hit@10"):
            assert part[metric].tolist() == pytest.approx(whole.loc[part.index, metric].tolist()), (model, metric)
        row = next(r for r in sampled if r["model"] == model)
        assert row["users"] == 3 and row["test_ndcg@10"] == pytest.approx(
            whole.loc[part.index, "ndcg@10"].mean(), abs=1e-4
        )
    chosen = [set(per_user.read_users(str(tmp_path / "sampled" / "runs" / m)).index) for m in models]
    assert chosen[0] == chosen[1] == chosen[2]  # the same users for every model
    markdown = (tmp_path / "sampled" / "benchmark.md").read_text()
    n_users = next(r for r in full if r["model"] == "Pop")["users"]
    assert f"Evaluated users: 3 of {n_users} (a seeded sample, seed 2020)" in markdown
    again = run("again", eval_users=3)  # the same seed, the same sample
    assert set(per_user.read_users(str(tmp_path / "again" / "runs" / "Pop")).index) == chosen[0]
    assert [r["test_ndcg@10"] for r in again] == [r["test_ndcg@10"] for r in sampled]


def test_eval_users_bad_values(toy_config_dict, tmp_path):
    overrides = bench_overrides(toy_config_dict)
    ran = []

    def runner(spec, log_path):
        ran.append(spec["model"])
        return benchmark.run_in_process(spec, log_path)

    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"eval_users: expected a number of test users >= 1, got {bad}"):
            benchmark.run_benchmark("toy", ["Pop"], "full", None, dict(overrides), str(tmp_path / "bad"),
                                    log=lambda m: None, runner=runner, eval_users=bad)  # fmt: skip
    assert ran == []  # named before any model runs
    messages = []
    rows = benchmark.run_benchmark("toy", ["Pop"], "full", None, {**overrides, "eval_users": 10_000},
                                   str(tmp_path / "all"), log=messages.append, runner=runner)  # fmt: skip
    assert any("eval_users: 10000 is more than the" in m and "evaluating all of them" in m for m in messages)
    assert rows[0]["users"] > 3 and "eval_users" not in rows[0].get("config", {})


def test_eval_users_on_the_command_line_is_checked_first(toy_config_dict, tmp_path):
    args = [f"--data_path={toy_config_dict['data_path']}", "--state=ERROR"]
    with pytest.raises(
        SystemExit, match="recbole-llmgen benchmark: eval_users: expected a number of test users >= 1, got 0"
    ):
        main(
            [
                "benchmark",
                "--dataset",
                "toy",
                "--models",
                "Pop",
                "--eval_users",
                "0",
                "--out",
                str(tmp_path / "o"),
                *args,
            ]
        )
    assert not (tmp_path / "o" / "runs" / "Pop.json").exists()


def test_each_llmgen_row_is_paired_with_every_other_row():
    """paired.csv / benchmark.md: LLMGen minus each other row, per user, with a verdict that follows
    the interval (better, worse, no difference shown)."""
    import numpy as np
    import pandas as pd

    from recbole_llmgen.benchmark.table import paired_comparisons, paired_markdown, verdict

    rng = np.random.default_rng(0)
    users = [f"u{i}" for i in range(400)]
    base = rng.random(400)
    frames = {
        "BPR": pd.DataFrame({"ndcg@10": base, "hit@10": (base > 0.5).astype(float)}, index=users),
        "SASRec": pd.DataFrame({"ndcg@10": base + 0.2, "hit@10": (base > 0.3).astype(float)}, index=users),
        "LLMGen": pd.DataFrame({"ndcg@10": base + 0.1 + rng.normal(0, 0.01, 400), "hit@10": (base > 0.4) * 1.0},
                               index=users),
    }  # fmt: skip
    rows = [{"model": "BPR"}, {"model": "SASRec"}, {"model": "LLMGen", "candidate_source": "none",
                                                    "score_method": "generate"}]  # fmt: skip
    pairs = paired_comparisons(rows, frames)
    assert [p["against"] for p in pairs] == ["BPR", "SASRec"]
    for pair, other in zip(pairs, ("BPR", "SASRec")):
        expected = (frames["LLMGen"]["ndcg@10"] - frames[other]["ndcg@10"]).mean()
        assert pair["ndcg@10"] == round(expected, 4)
        assert pair["ndcg@10_low"] <= pair["ndcg@10"] <= pair["ndcg@10_high"]
    assert [verdict(p) for p in pairs] == ["better", "worse"]
    text = paired_markdown(pairs)
    assert "| LLMGen (generates from the catalogue, no candidate model) | SASRec | -0.1" in text
    assert text.count("\n| LLMGen (") == 2  # one row per pair


def test_a_row_is_rerun_when_what_it_read_changes(toy_config_dict, tmp_path, monkeypatch):
    """The run hash covers the dataset files' contents and the code's versions (recorded in the row):
    an unchanged rerun reuses the row, changed data or another release reruns it."""
    from recbole_llmgen.benchmark import inputs

    ran = []

    def runner(spec, log_path):
        ran.append(spec["model"])
        return benchmark.run_in_process(spec, log_path)

    out = str(tmp_path / "bench")

    def run():
        return benchmark.run_benchmark("toy", ["Pop"], "full", None, bench_overrides(toy_config_dict), out,
                                       log=lambda m: None, runner=runner)  # fmt: skip

    first = run()
    assert first[0]["inputs"]["data"] and first[0]["inputs"]["versions"]["recbole"] == "1.2.1"
    run()
    assert ran == ["Pop"]  # unchanged: reused
    inter = os.path.join(toy_config_dict["data_path"], "toy", "toy.inter")
    with open(inter, "a", encoding="utf-8") as f:
        f.write("u0\ti29\t5\t99999\n")  # re-converted data
    third = run()
    assert ran == ["Pop", "Pop"] and third[0]["inputs"]["data"] != first[0]["inputs"]["data"]
    monkeypatch.setattr(inputs, "versions", lambda: {"recbole-llmgen": "9.9", "recbole": "1.2.1"})
    run()
    assert ran == ["Pop", "Pop", "Pop"]


def test_the_weights_identity_follows_the_weights_not_the_path(tiny_llm_path, tmp_path):
    import shutil

    from recbole_llmgen.digests import weights_digest

    moved = shutil.copytree(tiny_llm_path, tmp_path / "moved")
    assert weights_digest(str(moved)) == weights_digest(tiny_llm_path)
    weights = next(p for p in moved.iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # another fine-tune behind the same path
    weights.write_bytes(bytes(data))
    assert weights_digest(str(moved)) != weights_digest(tiny_llm_path)
    assert weights_digest("org/not-here") == "hub:org/not-here"
