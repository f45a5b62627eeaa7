"""Amazon review dumps: reviews and metadata as JSON lines (2014, 2018 and 2023 keys), .gz or not."""

from __future__ import annotations

import ast
import json

import pandas as pd

from recbole_llmgen.convert.common import ConversionError, Problems, as_token_seq, clean_text, parse_number, read_lines
from recbole_llmgen.convert.interactions import InteractionLog

# (user, item, rating, time, time divisor to seconds) per release
REVIEW_KEYS = [
    ("reviewerID", "asin", "overall", "unixReviewTime", 1),  # 2014, 2018
    ("user_id", "parent_asin", "rating", "timestamp", 1000),  # 2023 (milliseconds)
]
ITEM_TYPES = {"title": "token_seq", "brand": "token", "categories": "token_seq"}


def _records(path, problems: Problems):
    for number, line in read_lines(path, "utf-8", problems):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            try:  # the 2014 metadata files are Python literals, not JSON
                record = ast.literal_eval(line)
            except (ValueError, SyntaxError):
                problems.add("bad JSON", path, number)
                continue
        if not isinstance(record, dict):
            problems.add("bad JSON", path, number, "not an object")
            continue
        yield number, record


def _categories(record) -> list[str]:
    value = record.get("categories", record.get("category", []))
    if isinstance(value, list) and value and isinstance(value[0], list):  # 2014: list of paths
        value = value[0]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _holds_reviews(path) -> bool:
    """Whether the file's first record is a review (a metadata file's first record is an item)."""
    for _, record in _records(path, Problems()):
        return any(keys[0] in record for keys in REVIEW_KEYS)
    return False


def read_amazon(inputs: list[str], problems: Problems):
    """Review files first (whatever the order given), then metadata: only the metadata of reviewed
    items is kept, so a category's full metadata dump does not have to fit in memory."""
    log, items, skipped = InteractionLog(), {}, 0
    reviews = {path: _holds_reviews(path) for path in inputs}  # peeks at each file's first record once
    for path in sorted(inputs, key=lambda path: not reviews[path]):
        metadata_file = not reviews[path]
        for number, record in _records(path, problems):
            keys = next((k for k in REVIEW_KEYS if k[0] in record), None)
            if keys is not None:
                user_key, item_key, rating_key, time_key, divisor = keys
                if item_key not in record and "asin" in record:
                    item_key = "asin"
                missing = [k for k in (user_key, item_key, rating_key, time_key) if k not in record]
                if missing:
                    problems.add("missing key", path, number, ", ".join(missing))
                    continue
                rating = parse_number(record[rating_key], float, problems, path, number, rating_key)
                stamp = parse_number(record[time_key], float, problems, path, number, time_key)
                if rating is None or stamp is None:
                    continue
                log.add(str(record[user_key]), str(record[item_key]), rating, stamp / divisor)
            elif "parent_asin" in record or "asin" in record:
                item = str(record.get("parent_asin") or record.get("asin"))
                if item in items:
                    continue  # the first record of an item is kept
                if metadata_file and len(log) and item not in log.items:
                    skipped += 1
                    continue
                items[item] = {
                    "item_id": item,
                    "title": clean_text(record.get("title", "")),
                    "brand": clean_text(record.get("brand", record.get("store", ""))),
                    "categories": as_token_seq(_categories(record)),
                }
            else:
                problems.add("missing key", path, number, "neither a review nor an item")
    if not len(log):
        raise ConversionError(
            f"--input: no Amazon reviews found in {inputs} (keys reviewerID/asin or user_id/parent_asin)"
        )
    frame = pd.DataFrame(list(items.values())) if items else None
    steps = [f"metadata of {skipped} items without reviews skipped"] if skipped else []
    return log, frame, ITEM_TYPES, steps
