"""MovieLens raw dumps: ml-100k (u.data, u.item), ml-1m (*.dat), ml-latest(-small) (CSV)."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from recbole_llmgen.convert.common import (
    ConversionError,
    Problems,
    as_token_seq,
    clean_text,
    parse_number,
    read_lines,
    split_title_year,
)
from recbole_llmgen.convert.interactions import InteractionLog

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip
ITEM_TYPES = {"title": "token_seq", "year": "token", "genre": "token_seq"}


def _files(inputs: list[str]) -> dict[str, Path]:
    found = {}
    for entry in map(Path, inputs):
        paths = sorted(entry.iterdir()) if entry.is_dir() else [entry]
        for path in paths:
            found[path.name] = path
    return found


def read_movielens(inputs: list[str], problems: Problems):
    files = _files(inputs)
    if "u.data" in files:
        return _read_100k(files, problems)
    if "ratings.dat" in files:
        return _read_1m(files, problems)
    if "ratings.csv" in files:
        return _read_latest(files, problems)
    raise ConversionError(
        f"--input: no MovieLens ratings file among {sorted(files)}; expected u.data (ml-100k), "
        "ratings.dat (ml-1m) or ratings.csv (ml-latest, ml-latest-small)"
    )


def _split_rows(path: Path, separator: str, encoding: str, columns: int, problems: Problems, header: bool = False):
    """(line number, fields) of the non-empty lines with exactly ``columns`` fields; others reported."""
    lines = read_lines(path, encoding, problems)
    if header:
        next(lines, None)
    for number, line in lines:
        if not line.strip():
            continue
        parts = next(csv.reader([line])) if separator == "," else line.split(separator)
        if len(parts) != columns:
            problems.add("wrong column count", path, number, f"{len(parts)} columns, expected {columns}")
            continue
        yield number, parts


def _ratings(path: Path, separator: str, encoding: str, problems: Problems, header: bool = False) -> InteractionLog:
    log = InteractionLog()
    for number, parts in _split_rows(path, separator, encoding, 4, problems, header):
        user, item, rating, timestamp = (p.strip() for p in parts)
        rating = parse_number(rating, float, problems, path, number, "rating")
        timestamp = parse_number(timestamp, float, problems, path, number, "timestamp") if rating is not None else None
        if rating is None or timestamp is None or not user or not item:
            continue
        log.add(user, item, rating, timestamp)
    return log


def _items(rows: list[tuple[str, str, list[str]]]) -> pd.DataFrame:
    records = []
    for item, raw_title, genres in rows:
        title, year = split_title_year(clean_text(raw_title))
        records.append({"item_id": item, "title": title, "year": year, "genre": as_token_seq(genres)})
    return pd.DataFrame(records, columns=["item_id", "title", "year", "genre"])


def _read_100k(files, problems):
    inter = _ratings(files["u.data"], "\t", "utf-8", problems)
    rows = []
    if "u.item" in files:
        for _, parts in _split_rows(files["u.item"], "|", "latin-1", 5 + len(ML100K_GENRES), problems):
            genres = [g for g, flag in zip(ML100K_GENRES, parts[5:]) if flag.strip() == "1"]
            rows.append((parts[0].strip(), parts[1], genres))
    return inter, _items(rows) if rows else None, ITEM_TYPES


def _read_1m(files, problems):
    inter = _ratings(files["ratings.dat"], "::", "latin-1", problems)
    rows = []
    if "movies.dat" in files:
        for _, parts in _split_rows(files["movies.dat"], "::", "latin-1", 3, problems):
            rows.append((parts[0].strip(), parts[1], parts[2].split("|")))
    return inter, _items(rows) if rows else None, ITEM_TYPES


def _read_latest(files, problems):
    inter = _ratings(files["ratings.csv"], ",", "utf-8", problems, header=True)
    rows = []
    if "movies.csv" in files:
        for _, parts in _split_rows(files["movies.csv"], ",", "utf-8", 3, problems, header=True):
            genres = [] if parts[2] == "(no genres listed)" else parts[2].split("|")
            rows.append((parts[0].strip(), parts[1], genres))
    return inter, _items(rows) if rows else None, ITEM_TYPES
