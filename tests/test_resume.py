"""An interrupted benchmark row goes on from its last checkpoint: RecBole's resume_checkpoint plus
what the row cannot recompute (earlier validations, the trainer's auto choices, losses, time)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import bench_overrides
from recbole.trainer import Trainer

from recbole_llmgen import benchmark
from recbole_llmgen.benchmark.run import progress_file
from recbole_llmgen.trainer import LLMGenTrainer


def _interrupt_at(monkeypatch, trainer_class, epoch: int, calls: list[int]):
    """Training raises when it reaches ``epoch`` (0-based), as a killed process would stop there;
    ``calls`` records every epoch trained."""
    original = trainer_class._train_epoch

    def train_epoch(self, train_data, epoch_idx, *args, **kwargs):
        calls.append(epoch_idx)
        if epoch_idx == epoch:
            raise RuntimeError("interrupted")
        return original(self, train_data, epoch_idx, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "_train_epoch", train_epoch)


def _run(models, overrides, out, logs, config_files=None):
    return benchmark.run_benchmark("toy", models, overrides=overrides, out=out, config_files=config_files,
                                   runner=benchmark.run_in_process, log=logs.append)  # fmt: skip


def test_an_interrupted_classic_row_resumes_after_its_checkpoint(toy_config_dict, tmp_path, monkeypatch):
    out, logs = str(tmp_path / "bench"), []
    overrides = bench_overrides(toy_config_dict, epochs=4, stopping_step=10, valid_metric="NDCG@10")
    calls: list[int] = []
    _interrupt_at(monkeypatch, Trainer, 2, calls)
    (failed,) = _run(["BPR"], overrides, out, logs)
    assert failed["status"] == "failed" and "interrupted" in failed["error"] and calls == [0, 1, 2]
    spec_file = os.path.join(out, "runs", "BPR")
    state = json.load(open(progress_file({"users_file": spec_file + ".users.csv"})))
    assert [e for e, _ in state["scores"]] == list(range(state["epoch"] + 1))  # up to the checkpoint's epoch
    assert os.path.isfile(state["checkpoint"]) and state["train_seconds"] >= 0
    monkeypatch.undo()
    calls.clear()
    _interrupt_at(monkeypatch, Trainer, -1, calls)  # records, never raises
    logs.clear()
    (row,) = _run(["BPR"], overrides, out, logs)
    assert any(f"BPR: resuming after epoch {state['epoch']}" in line for line in logs), logs
    assert row["status"] == "ok" and row["resumed_from_epoch"] == state["epoch"]
    assert calls == list(range(state["epoch"] + 1, 4))  # only the epochs after the checkpoint's
    assert row["epochs_trained"] == 4 and [p["epoch"] for p in row["valid_curve"]] == [0, 1, 2, 3]
    assert row["valid_curve"][: state["epoch"] + 1] == [
        {"epoch": e, "valid": round(v, 4), "train_loss": round(float(state["train_loss"][str(e)]), 4)}
        for e, v in state["scores"]
    ]
    assert not os.path.exists(progress_file({"users_file": spec_file + ".users.csv"}))  # finished: gone
    assert "resumed after" in open(os.path.join(out, "benchmark.md")).read()
    logs.clear()
    (again,) = _run(["BPR"], overrides, out, logs)  # a finished row is reused, not resumed
    assert any("reused" in line for line in logs) and again["test_ndcg@10"] == row["test_ndcg@10"]


def test_a_resumed_fused_llmgen_keeps_its_earlier_auto_choices(toy_config_dict, tmp_path, monkeypatch):
    """score_fusion: auto: the weights chosen and the fused/LLM-alone results of the validations
    before the interruption are in the resumed row's curve; another config never resumes it."""
    out, logs = str(tmp_path / "bench"), []
    overrides = bench_overrides(toy_config_dict, max_history_items=4, llm_dtype="float32", epochs=3,
                                train_mode="lora", score_fusion="auto", candidate_source="pop",
                                stopping_step=10)  # fmt: skip
    calls: list[int] = []
    _interrupt_at(monkeypatch, LLMGenTrainer, 2, calls)
    (failed,) = _run(["LLMGen"], overrides, out, logs)
    assert failed["status"] == "failed"
    state = json.load(open(os.path.join(out, "runs", "LLMGen.progress.json")))
    assert len(state["fusion_history"]) == len(state["fusion_weights"]) == len(state["scores"]) >= 1
    monkeypatch.undo()
    logs.clear()
    rows = _run(["LLMGen"], overrides, out, logs)
    fused = rows[0]
    assert fused["status"] == "ok" and fused["resumed_from_epoch"] == state["epoch"]
    curve = fused["valid_curve"]
    assert [p["epoch"] for p in curve] == [0, 1, 2]
    assert [p["fusion_weight"] for p in curve[: len(state["scores"])]] == state["fusion_weights"]
    assert all("fused_ndcg@10" in p and "llm_alone_ndcg@10" in p for p in curve)


@pytest.mark.parametrize("change", ["hash", "checkpoint"])
def test_a_progress_file_of_another_run_or_without_its_checkpoint_is_ignored(toy_config_dict, tmp_path, monkeypatch,
                                                                              change):  # fmt: skip
    out, logs = str(tmp_path / "bench"), []
    overrides = bench_overrides(toy_config_dict, epochs=3, stopping_step=10)
    _interrupt_at(monkeypatch, Trainer, 1, [])
    _run(["BPR"], overrides, out, logs)
    monkeypatch.undo()
    path = os.path.join(out, "runs", "BPR.progress.json")
    state = json.load(open(path))
    if change == "hash":
        state["hash"] = "another run"
        json.dump(state, open(path, "w"))
    else:
        os.remove(state["checkpoint"])
    logs.clear()
    (row,) = _run(["BPR"], overrides, out, logs)
    assert any("BPR: running" in line for line in logs) and row["resumed_from_epoch"] is None
