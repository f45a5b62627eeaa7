"""Run a command and report the peak memory of its whole process tree.

    python benchmarks/tree_memory.py [--interval 0.5] [--json PATH] -- COMMAND [ARG ...]

`/usr/bin/time` and farm-bench report the largest *single* process; a benchmark that starts
worker processes (``--llm-nproc``, RecBole's DDP) needs the sum. Every ``--interval`` seconds this
sums, over the command and all its descendants, the proportional set size (PSS: a page shared by
k processes counts 1/k to each, so the model weights two ranks map from one file count once) and
the resident set size (RSS: shared pages counted in every process, an upper bound). It prints the
peaks, the moment of each and the process count then, as one JSON line on stderr (and to
``--json``). The command's exit status is passed through. Linux only (reads /proc).

A sampler misses a peak shorter than its interval; 0.5 s is fine for stages that hold their memory
for seconds (model loading, training steps, evaluation batches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def children_of() -> dict[int, list[int]]:
    """Map pid -> child pids, from /proc/*/stat."""
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        # the command name is in parentheses and may hold spaces: split after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        tree.setdefault(int(fields[1]), []).append(int(name))
    return tree


def descendants(root: int) -> list[int]:
    tree = children_of()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


def memory_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in kB; (0, 0) once it has gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def watch(command: list[str], interval: float) -> tuple[int, dict]:
    start = time.monotonic()
    process = subprocess.Popen(command)
    peak = {"pss_mb": 0.0, "rss_mb": 0.0, "pss_at_s": 0.0, "rss_at_s": 0.0, "processes_at_pss_peak": 0}
    largest_processes = 0
    while process.poll() is None:
        pids = descendants(process.pid)
        pss = rss = 0
        for pid in pids:
            one_pss, one_rss = memory_kb(pid)
            pss += one_pss
            rss += one_rss
        now = round(time.monotonic() - start, 1)
        largest_processes = max(largest_processes, len(pids))
        if pss / 1024 > peak["pss_mb"]:
            peak.update(pss_mb=round(pss / 1024, 1), pss_at_s=now, processes_at_pss_peak=len(pids))
        if rss / 1024 > peak["rss_mb"]:
            peak.update(rss_mb=round(rss / 1024, 1), rss_at_s=now)
        time.sleep(interval)
    peak.update(
        seconds=round(time.monotonic() - start, 1),
        most_processes=largest_processes,
        interval_s=interval,
        returncode=process.returncode,
        command=" ".join(command),
    )
    return process.returncode, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples (default 0.5)")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("command: give the command to run after --, e.g. -- recbole-llmgen benchmark ...")
    if args.interval <= 0:
        parser.error(f"--interval: {args.interval} is not allowed; give a positive number of seconds")
    returncode, peak = watch(command, args.interval)
    line = json.dumps(peak)
    print(line, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(line + "\n")
    return returncode


if __name__ == "__main__":
    sys.exit(main())
