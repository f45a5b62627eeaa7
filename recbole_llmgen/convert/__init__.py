"""Raw dataset dumps in, RecBole atomic files with item text out.

``convert("movielens", ["path/to/ml-1m"], "datasets/ml-1m")`` writes ``ml-1m.inter`` and
``ml-1m.item`` that RecBole loads and LLMGen uses without extra config.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recbole_llmgen.convert.amazon import read_amazon
from recbole_llmgen.convert.common import (
    ConversionError,
    FilterOptions,
    Problems,
    check_output,
)
from recbole_llmgen.convert.interactions import write_dataset
from recbole_llmgen.convert.movielens import read_movielens
from recbole_llmgen.convert.tabular import CsvOptions, read_csv

FORMATS = ("movielens", "amazon", "csv")


@dataclass
class ConversionReport:
    output: Path
    interactions: int
    users: int
    items: int
    items_with_text: int
    problems: Problems
    steps: list[str] = field(default_factory=list)
    peak_mb: float | None = None  # the converting process's peak resident memory

    def __str__(self) -> str:
        lines = [
            f"wrote {self.output}: {self.interactions} interactions, {self.users} users, {self.items} items "
            f"({self.items_with_text} with text)",
            *self.steps,
            self.problems.summary(),
        ]
        if self.peak_mb is not None:
            lines.append(f"peak memory: {self.peak_mb:,.0f} MB (this process)")
        return "\n".join(lines)


def convert(
    format: str,
    inputs: list[str],
    output: str,
    filters: FilterOptions | None = None,
    csv_options: CsvOptions | None = None,
    strict: bool = False,
    overwrite: bool = False,
) -> ConversionReport:
    if format not in FORMATS:
        raise ConversionError(f"FORMAT: {format!r} is not supported; choose one of {', '.join(FORMATS)}")
    missing = [p for p in inputs if not Path(p).exists()]
    if missing:
        raise ConversionError(f"--input: {missing} do not exist")
    check_output(output, overwrite)  # before reading anything
    problems = Problems(strict=strict)
    steps: list[str] = []
    if format == "movielens":
        log, items, types = read_movielens(inputs, problems)
    elif format == "amazon":
        log, items, types, steps = read_amazon(inputs, problems)
    else:
        log, items, types = read_csv(inputs, problems, csv_options or CsvOptions())
    steps.insert(0, f"read {len(log)} interactions")
    inter = log.table().filtered(filters or FilterOptions(), steps)
    if not len(inter):
        raise ConversionError(
            "no interactions left after filtering; lower --min-user-inter/--min-item-inter/--rating-threshold"
        )
    inter = inter.sorted_by_user_and_time()
    path = write_dataset(output, inter, items, types, overwrite=overwrite)
    kept = inter.kept_items()
    with_text = 0
    if items is not None:
        text_cols = [c for c, t in types.items() if t == "token_seq" and c in items][:1]
        if text_cols:
            with_text = int(items[items["item_id"].isin(kept)][text_cols[0]].astype(bool).sum())
    users = len(np.unique(inter.user))
    return ConversionReport(path, len(inter), users, len(kept), with_text, problems, steps, peak_memory_mb())


def peak_memory_mb() -> float | None:
    """The process's peak resident memory so far (Linux, macOS); None where it cannot be read."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


__all__ = ["convert", "ConversionError", "ConversionReport", "FilterOptions", "CsvOptions", "FORMATS"]
