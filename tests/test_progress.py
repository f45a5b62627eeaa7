"""Progress of long work on the benchmark's console: written by the worker, printed by the parent."""

import subprocess
import sys

from conftest import build

from recbole_llmgen import progress
from recbole_llmgen.trainer import LLMGenTrainer


def test_nothing_is_written_without_the_variable(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    assert progress.tracker("stage", 10, "steps") is None


def test_line_gives_rate_and_time_left():
    state = {"stage": "LLMGen: evaluating", "done": 30, "total": 90, "unit": "users", "seconds": 15.0, "note": ""}
    assert progress.line(state) == "LLMGen: evaluating: 30/90 users, 2.00/s, ~30 s left"
    assert progress.line({**state, "done": 0}) == "LLMGen: evaluating: 0/90 users"
    slow = {**state, "seconds": 600.0, "note": "loss 1.234"}
    assert progress.line(slow) == "LLMGen: evaluating: 30/90 users, 0.05/s, ~20 min left (loss 1.234)"


def test_the_console_shows_a_child_processs_progress(tmp_path, monkeypatch):
    path = tmp_path / "progress.json"
    code = (
        "import time; from recbole_llmgen import progress\n"
        "for stage in ('first', 'second'):\n"
        "    p = progress.tracker(stage, 3, 'steps')\n"
        "    for _ in range(3):\n"
        "        time.sleep(0.3); p.advance()\n"
    )
    monkeypatch.setattr(progress, "WRITE_EVERY", 0.0)
    process = subprocess.Popen([sys.executable, "-c", code], env={**__import__("os").environ, progress.ENV: str(path)})
    lines = []
    assert progress.watch(process, str(path), lines.append, poll=0.1) == 0
    stages = [line.split(":")[0].strip() for line in lines]
    assert stages[0] == "first" and "second" in stages  # a line when a stage starts
    assert len(lines) <= 4  # not a line per poll: PRINT_EVERY within a stage


def test_training_and_evaluation_report_their_progress(toy_config_dict, tmp_path, monkeypatch):
    states = []
    monkeypatch.setenv(progress.ENV, str(tmp_path / "progress.json"))
    monkeypatch.setattr(
        progress.Progress, "_write", lambda self, note="": states.append((self.stage, self.done, self.total))
    )
    config_dict = {**toy_config_dict, "train_mode": "lora", "lora_r": 4, "epochs": 1, "train_batch_size": 4}
    config, model, train_data, valid_data, test_data = build(config_dict)
    trainer = LLMGenTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=False)
    training = [s for s in states if s[0] == "LLMGen: epoch 1: training"]
    assert training and training[-1][1] == training[-1][2] > 0  # every optimizer step counted
    evaluating = [s for s in states if s[0] == "LLMGen: evaluating"]
    users = len(valid_data._dataset)
    assert evaluating and evaluating[-1][1:] == (users, users)
    assert trainer._full_sort_batch_eval.__func__ is LLMGenTrainer._full_sort_batch_eval  # unwrapped after


def test_a_stage_that_does_not_move_is_not_repeated(tmp_path, monkeypatch):
    path = tmp_path / "progress.json"
    progress.Progress("SASRec: training", 3, "epochs at most", str(path))  # written once, never advanced

    class Running:  # a process that polls as running 5 times, then exits
        polls, returncode = 0, 0

        def poll(self):
            self.polls += 1
            return None if self.polls <= 5 else 0

    monkeypatch.setattr(progress, "PRINT_EVERY", 0.0)
    lines = []
    progress.watch(Running(), str(path), lines.append, poll=0.01)
    assert lines == ["    SASRec: training: 0/3 epochs at most"]  # once, not every poll
    monkeypatch.setattr(progress, "QUIET_EVERY", 0.0)
    lines.clear()
    progress.watch(Running(), str(path), lines.append, poll=0.01)
    assert len(lines) == 5 and lines[1].endswith(" s in this stage)")  # a heartbeat says how long


def test_a_row_built_from_another_model_shows_its_own_name():
    from recbole_llmgen import benchmark

    lines = []
    console = benchmark.named(lines.append, {"model": "LLMGen", "name": "TextRetriever"})
    console("    LLMGen: evaluating: 5/10 users")
    assert lines == ["    TextRetriever: evaluating: 5/10 users"]
    append = lines.append
    assert benchmark.named(append, {"model": "LLMGen"}) is append  # its own row: unchanged
