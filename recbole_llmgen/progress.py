"""Progress of long work, for the benchmark's console.

A benchmark runs each model in its own process, whose output goes to the model's log file; an
LLM row can run for most of an hour there. The worker reports where it is (stage, done, total)
into a small JSON file named by the environment variable ``RECBOLE_LLMGEN_PROGRESS`` (at most
once a second, overwritten in place: the log file is never flooded), and the benchmark's own
process prints it to the console whenever the stage changes, then every ``PRINT_EVERY`` seconds
while it moves and every ``QUIET_EVERY`` seconds while it does not (:func:`watch`). Without the variable (a user's own ``run_recbole``) nothing is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable

ENV = "RECBOLE_LLMGEN_PROGRESS"
WRITE_EVERY = 1.0  # seconds between writes of the progress file
PRINT_EVERY = 30.0  # seconds between console lines of a stage that moved
QUIET_EVERY = 120.0  # seconds between console lines of a stage that did not (an epoch of a classic model)


class Progress:
    """``done`` of ``total`` ``unit`` of one stage; :meth:`advance` writes the file when due."""

    def __init__(self, stage: str, total: int, unit: str, path: str):
        self.stage, self.total, self.unit, self.path = stage, int(total), unit, path
        self.done, self.start, self.written = 0, time.monotonic(), 0.0
        self._write()

    def advance(self, count: int = 1, note: str = "") -> None:
        self.done += count
        now = time.monotonic()
        if now - self.written >= WRITE_EVERY or self.done >= self.total:
            self._write(note)

    def _write(self, note: str = "") -> None:
        self.written = time.monotonic()
        state = {
            "stage": self.stage,
            "done": self.done,
            "total": self.total,
            "unit": self.unit,
            "seconds": round(self.written - self.start, 1),
            "note": note,
        }
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(state, f)
            os.replace(tmp, self.path)
        except OSError:  # progress is a courtesy: never fail the work for it
            pass


def tracker(stage: str, total: int, unit: str) -> Progress | None:
    """A :class:`Progress` when this process reports progress (the variable is set, and it is the
    only process or rank 0 of a multi-process run), else None."""
    path = os.environ.get(ENV)
    if not path or total <= 0:
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    return Progress(stage, total, unit, path)


def line(state: dict) -> str:
    """``stage: done/total unit, rate/s, ~time left`` of a progress state."""
    done, total, seconds = state["done"], state["total"], state["seconds"]
    text = f"{state['stage']}: {done}/{total} {state['unit']}"
    if done and seconds > 0:
        rate = done / seconds
        text += f", {rate:.2f}/s, ~{_duration((total - done) / rate)} left"
    if state.get("note"):
        text += f" ({state['note']})"
    return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def read(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def watch(process: subprocess.Popen, path: str, console: Callable[[str], None], poll: float = 2.0) -> int:
    """Wait for ``process``, printing its progress file to ``console``: when a stage starts, then at
    most every ``PRINT_EVERY`` seconds when it moved, and every ``QUIET_EVERY`` seconds when it did
    not (with the time spent in the stage); returns its exit code."""
    shown, shown_at, stage_at = None, 0.0, 0.0
    while process.poll() is None:
        time.sleep(poll)
        state = read(path)
        if not state:
            continue
        now = time.monotonic()
        if shown is None or state["stage"] != shown["stage"]:
            stage_at = now
        elif now - shown_at < (PRINT_EVERY if state["done"] != shown["done"] else QUIET_EVERY):
            continue
        text = line(state)
        if shown is not None and state["stage"] == shown["stage"] and state["done"] == shown["done"]:
            text += f" ({now - stage_at:.0f} s in this stage)"
        console("    " + text)
        shown, shown_at = state, now
    return process.returncode
