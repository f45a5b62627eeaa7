"""benchmarks/tree_memory.py: the peak memory of a command's whole process tree, its exit status passed on."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import tree_memory  # noqa: E402

HOLD = "import time; b = bytearray({mb} * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"


def test_the_peak_sums_every_process_of_the_tree_and_the_exit_status_passes(tmp_path):
    child = f'{sys.executable} -c "{HOLD.format(mb=150)}"'
    command = [sys.executable, "-c", f"import subprocess, sys; p = subprocess.Popen({child!r}, shell=True); "
               f"{HOLD.format(mb=150)}; p.wait(); sys.exit(3)"]  # fmt: skip
    out = tmp_path / "tree.json"
    assert tree_memory.main(["--interval", "0.1", "--json", str(out), "--", *command]) == 3
    peak = json.loads(out.read_text())
    assert peak["returncode"] == 3 and peak["most_processes"] >= 2  # python and the child python (and a shell)
    assert peak["pss_mb"] >= 290 and peak["rss_mb"] >= peak["pss_mb"]  # two 150 MB buffers held at once


def test_no_command_is_named():
    with pytest.raises(SystemExit):
        tree_memory.main(["--"])
