"""Raw dataset dumps in, RecBole atomic files with item text out.

``convert("movielens", ["path/to/ml-1m"], "datasets/ml-1m")`` writes ``ml-1m.inter`` and
``ml-1m.item`` that RecBole loads and LLMGen uses without extra config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from recbole_llmgen.convert.amazon import read_amazon
from recbole_llmgen.convert.common import (
    ConversionError,
    FilterOptions,
    Problems,
    check_output,
    filter_interactions,
    write_dataset,
)
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

    def __str__(self) -> str:
        lines = [
            f"wrote {self.output}: {self.interactions} interactions, {self.users} users, {self.items} items "
            f"({self.items_with_text} with text)",
            *self.steps,
            self.problems.summary(),
        ]
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
    if format == "movielens":
        inter, items, types = read_movielens(inputs, problems)
    elif format == "amazon":
        inter, items, types = read_amazon(inputs, problems)
    else:
        inter, items, types = read_csv(inputs, problems, csv_options or CsvOptions())
    steps = [f"read {len(inter)} interactions"]
    inter = filter_interactions(inter, filters or FilterOptions(), steps)
    if inter.empty:
        raise ConversionError(
            "no interactions left after filtering; lower --min-user-inter/--min-item-inter/--rating-threshold"
        )
    if "timestamp" in inter:
        inter = inter.sort_values(["user_id", "timestamp"], kind="stable")
    path = write_dataset(output, inter, items, types, overwrite=overwrite)
    kept = set(inter["item_id"])
    with_text = 0
    if items is not None:
        text_cols = [c for c, t in types.items() if t == "token_seq" and c in items][:1]
        if text_cols:
            with_text = int(items[items["item_id"].isin(kept)][text_cols[0]].astype(bool).sum())
    return ConversionReport(path, len(inter), inter["user_id"].nunique(), len(kept), with_text, problems, steps)


__all__ = ["convert", "ConversionError", "ConversionReport", "FilterOptions", "CsvOptions", "FORMATS"]
