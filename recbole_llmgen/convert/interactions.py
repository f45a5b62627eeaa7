"""Interactions held compactly while a raw dump streams in, then filtered and written in chunks.

A raw line becomes two integer codes (user, item: each id string is kept once) and at most two
floats in growing typed arrays: 4 + 4 + 8 + 8 bytes an interaction instead of a Python tuple of
strings (~250 bytes), so 10 million interactions fit in ~250 MB and the raw file is never held.
Deduplication, the rating threshold, k-core and the sort are array operations on the codes.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recbole_llmgen.convert.common import ConversionError, FilterOptions, check_output, write_atomic

INTER_TYPES = {"user_id": "token", "item_id": "token", "rating": "float", "timestamp": "float"}
WRITE_CHUNK_ROWS = 200_000


class Interner:
    """Id strings to dense codes 0, 1, 2, ... in order of first appearance."""

    def __init__(self):
        self.codes: dict[str, int] = {}
        self.names: list[str] = []

    def __call__(self, name: str) -> int:
        code = self.codes.get(name)
        if code is None:
            code = self.codes[name] = len(self.names)
            self.names.append(name)
        return code

    def __contains__(self, name: str) -> bool:
        return name in self.codes


class InteractionLog:
    """Append-only interactions as they are read: ``add(user, item, rating, timestamp)``."""

    def __init__(self, rating: bool = True, timestamp: bool = True):
        self.users, self.items = Interner(), Interner()
        self._user, self._item = array("i"), array("i")
        self._rating = array("d") if rating else None
        self._timestamp = array("d") if timestamp else None

    def add(self, user: str, item: str, rating: float | None = None, timestamp: float | None = None) -> None:
        self._user.append(self.users(user))
        self._item.append(self.items(item))
        if self._rating is not None:
            self._rating.append(rating)
        if self._timestamp is not None:
            self._timestamp.append(timestamp)

    def __len__(self) -> int:
        return len(self._user)

    def table(self) -> InteractionTable:
        def column(values):
            return None if values is None else np.frombuffer(values, dtype=np.float64)

        return InteractionTable(
            np.frombuffer(self._user, dtype=np.int32),
            np.frombuffer(self._item, dtype=np.int32),
            column(self._rating),
            column(self._timestamp),
            self.users.names,
            self.items.names,
        )


@dataclass
class InteractionTable:
    """Columns as arrays; ``user``/``item`` are codes into ``user_names``/``item_names``."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray | None
    timestamp: np.ndarray | None
    user_names: list[str]
    item_names: list[str]

    def __len__(self) -> int:
        return len(self.user)

    @property
    def columns(self) -> list[str]:
        return ["user_id", "item_id"] + [c for c in ("rating", "timestamp") if getattr(self, c) is not None]

    def take(self, rows: np.ndarray) -> InteractionTable:
        """The rows selected by a boolean mask or an index array (names unchanged)."""

        def pick(values):
            return None if values is None else values[rows]

        return InteractionTable(
            self.user[rows], self.item[rows], pick(self.rating), pick(self.timestamp), self.user_names, self.item_names
        )

    def kept_items(self) -> set[str]:
        return {self.item_names[code] for code in np.unique(self.item)}

    def filtered(self, options: FilterOptions, log: list[str]) -> InteractionTable:
        """Dedup (the first of repeated user-item pairs), the rating threshold, then iterated k-core."""
        table = self
        if options.dedup:
            pairs = table.user.astype(np.int64) * max(len(table.item_names), 1) + table.item
            first = np.sort(np.unique(pairs, return_index=True)[1])
            log.append(f"duplicates removed: {len(table) - len(first)}")
            table = table.take(first)
        if options.rating_threshold is not None:
            if table.rating is None:
                raise ConversionError("--rating-threshold: the interactions have no rating column")
            keep = table.rating >= options.rating_threshold
            log.append(f"below rating threshold {options.rating_threshold}: {int((~keep).sum())} removed")
            table = table.take(keep)
        table, rounds = table.k_core(options.min_user_inter, options.min_item_inter)
        if options.min_user_inter or options.min_item_inter:
            log.append(
                f"k-core (users >= {options.min_user_inter}, items >= {options.min_item_inter}): {rounds} round(s)"
            )
        return table

    def k_core(self, min_user: int, min_item: int) -> tuple[InteractionTable, int]:
        """Remove users/items below the minimums until none is left below (a fixed point)."""
        table, rounds = self, 0
        while True:
            users = np.bincount(table.user, minlength=len(table.user_names))[table.user]
            items = np.bincount(table.item, minlength=len(table.item_names))[table.item]
            keep = (users >= min_user) & (items >= min_item)
            if keep.all():
                return table, rounds
            table = table.take(keep)
            rounds += 1

    def sorted_by_user_and_time(self) -> InteractionTable:
        """Users in the order of their id strings, each user's rows by time (ties keep file order)."""
        if self.timestamp is None:
            return self
        rank = np.empty(len(self.user_names), dtype=np.int64)
        rank[np.argsort(np.array(self.user_names, dtype=object), kind="stable")] = np.arange(len(self.user_names))
        return self.take(np.lexsort((self.timestamp, rank[self.user])))

    def write(self, path: Path) -> None:
        """RecBole's atomic .inter file, written a chunk of rows at a time."""
        columns = self.columns
        users = np.array(self.user_names, dtype=object)
        items = np.array(self.item_names, dtype=object)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write("\t".join(f"{c}:{INTER_TYPES[c]}" for c in columns) + "\n")
            for start in range(0, len(self), WRITE_CHUNK_ROWS):
                rows = slice(start, start + WRITE_CHUNK_ROWS)
                cells = [users[self.user[rows]], items[self.item[rows]]]
                cells += [map(format_float, values[rows].tolist()) for values in (self.rating, self.timestamp)
                          if values is not None]  # fmt: skip
                f.writelines("\t".join(row) + "\n" for row in zip(*cells))


def format_float(value: float) -> str:
    """1995.0 -> '1995', 4.5 -> '4.5', NaN -> '' (RecBole reads both back as the same float)."""
    if math.isnan(value):
        return ""
    return str(int(value)) if value.is_integer() else repr(value)


def write_dataset(
    output: str | os.PathLike,
    inter: InteractionTable,
    items: pd.DataFrame | None,
    item_types: dict[str, str],
    overwrite: bool = False,
) -> Path:
    """Write NAME.inter (+ NAME.item) into ``output`` (NAME = the folder name), atomically."""
    output = check_output(output, overwrite)
    name = output.name
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=output.parent))
    try:
        inter.write(staging / f"{name}.inter")
        if items is not None:
            items = items[items["item_id"].isin(inter.kept_items())]
            write_atomic(items, {"item_id": "token", **item_types}, staging / f"{name}.item")
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return output
