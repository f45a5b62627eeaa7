"""What every converter shares: reading raw lines, counting malformed rows, cleaning text and
writing RecBole atomic files safely (the interactions themselves: interactions.py)."""

from __future__ import annotations

import gzip
import html
import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

SHOWN_LINES = 5


class ConversionError(ValueError):
    """A conversion that cannot proceed (bad options, strict mode, existing output)."""


@dataclass
class Problems:
    """Malformed rows by kind, with the first few (file, line) places of each. Nothing is hidden."""

    strict: bool = False
    counts: Counter = field(default_factory=Counter)
    places: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, path: str | os.PathLike, line: int, detail: str = "") -> None:
        where = f"{Path(path).name}:{line}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise ConversionError(f"malformed row, {kind}: {where} (--strict makes malformed rows fatal)")
        self.counts[kind] += 1
        self.places.setdefault(kind, [])
        if len(self.places[kind]) < SHOWN_LINES:
            self.places[kind].append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "malformed rows: none"
        parts = [f"{kind}: {n} (first at {', '.join(self.places[kind])})" for kind, n in self.counts.most_common()]
        return f"malformed rows skipped: {self.total}; " + "; ".join(parts)


def open_text(path: str | os.PathLike, encoding: str):
    """Open a text file, gzipped or not; undecodable bytes become U+FFFD (reported per line)."""
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    return opener(path, "rt", encoding=encoding, errors="replace", newline="")


def read_lines(path, encoding: str, problems: Problems) -> Iterator[tuple[int, str]]:
    """(line number, line) pairs without line endings; lines with undecodable bytes are reported."""
    with open_text(path, encoding) as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if "\ufffd" in line and encoding.lower().replace("-", "") == "utf8":
                problems.add("bad encoding", path, number)
                continue
            yield number, line


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean_text(value) -> str:
    """Unescape HTML entities, drop control characters, turn tabs/newlines into spaces."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = html.unescape(str(value))
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub(" ", text)
    return re.sub(r"\s+", " ", text).strip()


def as_token(value) -> str:
    """A value usable as a RecBole token: no whitespace inside."""
    return re.sub(r"\s+", "_", clean_text(value))


def as_token_seq(values) -> str:
    """A list of labels as a space-separated token_seq (spaces inside a label become _)."""
    return " ".join(t for t in (as_token(v) for v in values) if t)


def parse_number(text: str, kind, problems: Problems, path, line: int, column: str):
    try:
        value = kind(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError
        return value
    except (TypeError, ValueError):
        problems.add("bad number", path, line, f"{column}={text!r}")
        return None


def split_title_year(title: str) -> tuple[str, str]:
    """'Toy Story (1995)' -> ('Toy Story', '1995'); no trailing year -> (title, '')."""
    match = re.match(r"^(.*?)\s*\((\d{4})\)\s*$", title)
    return (match.group(1), match.group(2)) if match else (title, "")


# ------------------------------------------------------------------------------ filtering


@dataclass
class FilterOptions:
    min_user_inter: int = 0
    min_item_inter: int = 0
    rating_threshold: float | None = None  # keep rating >= threshold (implicit feedback)
    dedup: bool = True


# ------------------------------------------------------------------------------ writing


def check_output(output: str | os.PathLike, overwrite: bool) -> Path:
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ConversionError(f"--output: {output} already exists and is not empty; pass --overwrite to replace it")
    return output


def write_atomic(frame: pd.DataFrame, types: dict[str, str], path: Path) -> None:
    columns = [c for c in frame.columns if c in types]
    header = "\t".join(f"{c}:{types[c]}" for c in columns)
    body = frame[columns].astype(object).where(frame[columns].notna(), "")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(header + "\n")
        for row in body.itertuples(index=False):
            f.write("\t".join(_cell(v) for v in row) + "\n")


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else (str(int(value)) if value.is_integer() else repr(value))
    return str(value)
