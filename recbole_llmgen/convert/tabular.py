"""Any interactions CSV (plus an optional items CSV), columns named by options."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

import pandas as pd

from recbole_llmgen.convert.common import ConversionError, Problems, clean_text, parse_number, read_lines
from recbole_llmgen.convert.interactions import InteractionLog


@dataclass
class CsvOptions:
    user_col: str = "user_id"
    item_col: str = "item_id"
    rating_col: str | None = "rating"
    time_col: str | None = "timestamp"
    items: str | None = None  # the items CSV
    item_id_col: str | None = None  # in the items CSV; default: item_col
    text_cols: list[str] = field(default_factory=lambda: ["title"])
    sep: str = ","
    encoding: str = "utf-8"


def _rows(path, options: CsvOptions, problems: Problems):
    lines = read_lines(path, options.encoding, problems)
    first = next(lines, None)
    if first is None:
        raise ConversionError(f"--input: {path} is empty")
    header = next(csv.reader([first[1]], delimiter=options.sep))
    for number, line in lines:
        if not line.strip():
            continue
        parts = next(csv.reader([line], delimiter=options.sep))
        if len(parts) != len(header):
            problems.add("wrong column count", path, number, f"{len(parts)} columns, expected {len(header)}")
            continue
        yield number, dict(zip(header, parts)), header


def _need(header, columns, option_names, path):
    for column, option in zip(columns, option_names):
        if column and column not in header:
            raise ConversionError(f"{option}: column {column!r} is not in {path}; columns: {header}")


def _timestamp(text: str, problems, path, number, column):
    try:
        return float(text)
    except ValueError:
        stamp = pd.to_datetime(text, errors="coerce", utc=True)
        if pd.isna(stamp):
            problems.add("bad number", path, number, f"{column}={text!r}")
            return None
        return stamp.timestamp()


def read_csv(inputs: list[str], problems: Problems, options: CsvOptions):
    if len(inputs) != 1:
        raise ConversionError(f"--input: the csv format takes one interactions file (items via --items), got {inputs}")
    path = inputs[0]
    log = InteractionLog(rating=bool(options.rating_col), timestamp=bool(options.time_col))
    checked = False
    for number, row, header in _rows(path, options, problems):
        if not checked:
            _need(header, [options.user_col, options.item_col, options.rating_col, options.time_col],
                  ["--user-col", "--item-col", "--rating-col", "--time-col"], path)  # fmt: skip
            checked = True
        user, item = row[options.user_col].strip(), row[options.item_col].strip()
        if not user or not item:
            problems.add("missing id", path, number)
            continue
        rating = timestamp = None
        if options.rating_col:
            rating = parse_number(row[options.rating_col], float, problems, path, number, options.rating_col)
            if rating is None:
                continue
        if options.time_col:
            timestamp = _timestamp(row[options.time_col], problems, path, number, options.time_col)
            if timestamp is None:
                continue
        log.add(user, item, rating, timestamp)
    items, types = None, {}
    if options.items:
        id_col = options.item_id_col or options.item_col
        records = []
        checked = False
        for _, row, header in _rows(options.items, options, problems):
            if not checked:
                _need(
                    header,
                    [id_col, *options.text_cols],
                    ["--item-id-col"] + ["--text-cols"] * len(options.text_cols),
                    options.items,
                )
                checked = True
            records.append({"item_id": row[id_col].strip(), **{c: clean_text(row[c]) for c in options.text_cols}})
        items = pd.DataFrame(records, columns=["item_id", *options.text_cols]).drop_duplicates("item_id", keep="first")
        types = {c: "token_seq" for c in options.text_cols}
    return log, items, types
