"""Amazon review dumps: reviews and metadata as JSON lines (2014, 2018 and 2023 keys), .gz or not."""

from __future__ import annotations

import ast
import json

import pandas as pd

from recbole_llmgen.convert.common import ConversionError, Problems, as_token_seq, clean_text, parse_number, read_lines

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


def read_amazon(inputs: list[str], problems: Problems):
    inter_rows, item_rows = [], []
    for path in inputs:
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
                inter_rows.append((str(record[user_key]), str(record[item_key]), rating, stamp / divisor))
            elif "parent_asin" in record or "asin" in record:
                item = record.get("parent_asin") or record.get("asin")
                item_rows.append(
                    {
                        "item_id": str(item),
                        "title": clean_text(record.get("title", "")),
                        "brand": clean_text(record.get("brand", record.get("store", ""))),
                        "categories": as_token_seq(_categories(record)),
                    }
                )
            else:
                problems.add("missing key", path, number, "neither a review nor an item")
    if not inter_rows:
        raise ConversionError(
            f"--input: no Amazon reviews found in {inputs} (keys reviewerID/asin or user_id/parent_asin)"
        )
    inter = pd.DataFrame(inter_rows, columns=["user_id", "item_id", "rating", "timestamp"])
    items = pd.DataFrame(item_rows).drop_duplicates("item_id", keep="first") if item_rows else None
    return inter, items, ITEM_TYPES
