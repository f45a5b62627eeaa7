"""Converters on small raw files written here: malformed lines, latin-1, tabs, gzip, k-core."""

import gzip
import json
import tracemalloc
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from recbole_llmgen.convert import ConversionError, CsvOptions, FilterOptions, convert
from recbole_llmgen.convert.common import Problems, clean_text
from recbole_llmgen.convert.interactions import InteractionLog
from recbole_llmgen.convert.movielens import _ratings


def read_atomic(path):
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def write_ml100k(folder, users=6, items=8):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        f"{u}\t{i}\t{1 + (u + i) % 5}\t{1000 + 10 * u + i}" for u in range(1, users + 1) for i in range(1, items + 1)
    ]
    lines.insert(3, "1\t2\t3")  # wrong column count
    lines.insert(5, "2\t3\tfive\t1000")  # bad number
    lines.append("1\t1\t5\t999999")  # repeated (user, item): the first is kept
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    flags = "|".join(["0"] * 19)
    genre = "|".join(["0", "1"] + ["0"] * 17)  # Action
    rows = [
        f"1|Caf\xe9 Society (1995)|01-Jan-1995||http://x|{genre}",
        "2|Tab\tTitle (1996)|||x|" + flags,
        "3||||x|" + flags,
    ]
    rows += [f"{i}|Movie {i} (19{80 + i})|||x|{flags}" for i in range(4, items + 1)]
    rows.append("99|Broken|row")
    (folder / "u.item").write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    return folder


def test_movielens_100k(tmp_path):
    raw = write_ml100k(tmp_path / "raw")
    report = convert("movielens", [str(raw)], str(tmp_path / "out" / "ml-small"))
    inter = read_atomic(tmp_path / "out" / "ml-small" / "ml-small.inter")
    items = read_atomic(tmp_path / "out" / "ml-small" / "ml-small.item")
    assert list(inter.columns) == ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
    assert len(inter) == 6 * 8  # malformed and duplicate rows gone
    first = inter[(inter["user_id:token"] == "1") & (inter["item_id:token"] == "1")]
    assert first["timestamp:float"].tolist() == ["1011"]  # the first of the duplicates
    assert list(items.columns) == ["item_id:token", "title:token_seq", "year:token", "genre:token_seq"]
    by_id = items.set_index("item_id:token")
    assert by_id.loc["1", "title:token_seq"] == "Café Society" and by_id.loc["1", "year:token"] == "1995"
    assert by_id.loc["1", "genre:token_seq"] == "Action"
    assert by_id.loc["2", "title:token_seq"] == "Tab Title"  # a tab cannot break the format
    assert by_id.loc["3", "title:token_seq"] == ""  # missing title kept, empty
    assert report.problems.counts == {"wrong column count": 2, "bad number": 1}
    assert "u.data:4" in report.problems.summary() and "u.item:" in report.problems.summary()
    assert report.items_with_text == 7


def test_strict_mode_fails_on_the_first_malformed_row(tmp_path):
    raw = write_ml100k(tmp_path / "raw")
    with pytest.raises(ConversionError, match=r"wrong column count: u.data:4.*--strict"):
        convert("movielens", [str(raw)], str(tmp_path / "out" / "x"), strict=True)
    assert not (tmp_path / "out" / "x").exists()


def test_overwrite_guard(tmp_path):
    raw = write_ml100k(tmp_path / "raw")
    out = tmp_path / "out" / "ds"
    convert("movielens", [str(raw)], str(out))
    before = (out / "ds.inter").read_text()
    with pytest.raises(ConversionError, match="already exists.*--overwrite"):
        convert("movielens", [str(raw)], str(out), filters=FilterOptions(min_user_inter=100))
    assert (out / "ds.inter").read_text() == before  # untouched
    convert("movielens", [str(raw)], str(out), filters=FilterOptions(rating_threshold=4), overwrite=True)
    assert (out / "ds.inter").read_text() != before


def test_movielens_1m_and_latest(tmp_path):
    m1 = tmp_path / "ml-1m"
    m1.mkdir()
    (m1 / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\nbad line\n")
    (m1 / "movies.dat").write_bytes("10::Amélie (2001)::Comedy|Romance\n20::Heat (1995)::Action\n".encode("latin-1"))
    convert("movielens", [str(m1 / "ratings.dat"), str(m1 / "movies.dat")], str(tmp_path / "out" / "m1"))
    items = read_atomic(tmp_path / "out" / "m1" / "m1.item").set_index("item_id:token")
    assert items.loc["10", "title:token_seq"] == "Amélie" and items.loc["10", "genre:token_seq"] == "Comedy Romance"

    latest = tmp_path / "ml-latest-small"
    latest.mkdir()
    (latest / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,11,4.5,964982703\n2,11,3.0,964981247\n")
    (latest / "movies.csv").write_text(
        'movieId,title,genres\n11,"American President, The (1995)",Comedy|Drama|Romance\n'
    )
    convert("movielens", [str(latest)], str(tmp_path / "out" / "latest"))
    items = read_atomic(tmp_path / "out" / "latest" / "latest.item").set_index("item_id:token")
    assert items.loc["11", "title:token_seq"] == "American President, The"
    inter = read_atomic(tmp_path / "out" / "latest" / "latest.inter")
    assert inter["rating:float"].tolist() == ["4.5", "3"]


def test_amazon_2018_gzipped_with_2014_metadata(tmp_path):
    reviews = tmp_path / "Books.json.gz"
    with gzip.open(reviews, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"reviewerID": "A1", "asin": "B1", "overall": 5.0, "unixReviewTime": 1400000000}) + "\n")
        f.write(json.dumps({"reviewerID": "A2", "asin": "B1", "overall": 3.0, "unixReviewTime": 1400000100}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"reviewerID": "A2", "asin": "B2", "overall": 4.0}) + "\n")  # no time
    meta = tmp_path / "meta_Books.json"
    meta.write_text(
        str({"asin": "B1", "title": "Dune &amp; Sons\n", "categories": [["Books", "Science Fiction"]], "brand": "Ace"})
        + "\n"
    )
    report = convert("amazon", [str(reviews), str(meta)], str(tmp_path / "out" / "books"))
    items = read_atomic(tmp_path / "out" / "books" / "books.item").set_index("item_id:token")
    assert items.loc["B1", "title:token_seq"] == "Dune & Sons"
    assert items.loc["B1", "categories:token_seq"] == "Books Science_Fiction"
    assert report.problems.counts == {"bad JSON": 1, "missing key": 1}


def test_amazon_2023_keys(tmp_path):
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text(
        json.dumps({"user_id": "U1", "parent_asin": "P1", "rating": 4, "timestamp": 1600000000000}) + "\n"
    )
    meta = tmp_path / "meta.jsonl"
    meta.write_text(
        json.dumps({"parent_asin": "P1", "title": "Lamp", "categories": ["Home", "Lighting"], "store": "Ikea"}) + "\n"
    )
    convert("amazon", [str(reviews), str(meta)], str(tmp_path / "out" / "home"))
    inter = read_atomic(tmp_path / "out" / "home" / "home.inter")
    assert inter["timestamp:float"].tolist() == ["1600000000"]  # milliseconds -> seconds


def test_generic_csv_with_dates_and_items(tmp_path):
    (tmp_path / "clicks.csv").write_text("uid;sku;when\nu1;s1;2024-01-02\nu1;s2;2024-01-03\nu2;s1;not a date\n")
    (tmp_path / "products.csv").write_text("sku;name;descr\ns1;Red Shoe;Nice\ns2;Blue Hat;Warm\n")
    options = CsvOptions(
        user_col="uid",
        item_col="sku",
        rating_col=None,
        time_col="when",
        items=str(tmp_path / "products.csv"),
        text_cols=["name"],
        sep=";",
    )
    report = convert("csv", [str(tmp_path / "clicks.csv")], str(tmp_path / "out" / "shop"), csv_options=options)
    inter = read_atomic(tmp_path / "out" / "shop" / "shop.inter")
    assert list(inter.columns) == ["user_id:token", "item_id:token", "timestamp:float"]
    assert report.problems.counts == {"bad number": 1}
    items = read_atomic(tmp_path / "out" / "shop" / "shop.item")
    assert list(items.columns) == ["item_id:token", "name:token_seq"]
    with pytest.raises(ConversionError, match=r"--user-col: column 'user' is not in"):
        convert(
            "csv",
            [str(tmp_path / "clicks.csv")],
            str(tmp_path / "out" / "x"),
            csv_options=CsvOptions(user_col="user", sep=";"),
        )


def interactions(rows):
    log = InteractionLog(rating=False, timestamp=False)
    for user, item in rows:
        log.add(user, item)
    return log.table()


def pairs(table):
    return [(table.user_names[u], table.item_names[i]) for u, i in zip(table.user, table.item)]


def test_k_core_reaches_a_fixed_point():
    rows = [("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "a"), ("u2", "b"), ("u3", "a"), ("u3", "d"), ("u4", "e")]
    out, rounds = interactions(rows).k_core(2, 2)
    users, items = zip(*pairs(out))
    assert min(Counter(users).values()) >= 2 and min(Counter(items).values()) >= 2
    assert out.k_core(2, 2)[1] == 0  # nothing more to remove
    # u3 loses d (1 interaction), then has only one item left and goes too: a second round
    assert set(users) == {"u1", "u2"} and set(items) == {"a", "b"} and rounds == 2


def test_streamed_conversion_equals_the_whole_table_in_pandas(tmp_path):
    """Dedup (first kept), threshold, iterated k-core and the sort, done on integer codes while
    streaming, give the rows a pandas pipeline on the whole table gives."""
    rng = np.random.default_rng(0)
    n = 4000
    raw = pd.DataFrame(
        {
            "userId": rng.integers(0, 120, n).astype(str),
            "movieId": (rng.zipf(1.6, n) % 300).astype(str),
            "rating": rng.integers(1, 11, n) / 2,
            "timestamp": rng.integers(0, 50, n),  # many ties: file order must break them
        }
    )
    folder = tmp_path / "ml-latest"
    folder.mkdir()
    raw.to_csv(folder / "ratings.csv", index=False)
    filters = FilterOptions(min_user_inter=5, min_item_inter=4, rating_threshold=2.0)
    report = convert("movielens", [str(folder)], str(tmp_path / "out" / "x"), filters=filters)

    expected = raw.rename(columns={"userId": "user_id", "movieId": "item_id"})
    expected = expected.drop_duplicates(["user_id", "item_id"], keep="first")
    expected = expected[expected["rating"] >= 2.0]
    while True:
        users = expected["user_id"].map(expected["user_id"].value_counts())
        items = expected["item_id"].map(expected["item_id"].value_counts())
        keep = (users >= 5) & (items >= 4)
        if keep.all():
            break
        expected = expected[keep]
    expected = expected.sort_values(["user_id", "timestamp"], kind="stable")
    got = read_atomic(tmp_path / "out" / "x" / "x.inter")
    assert len(got) == report.interactions and 0 < len(got) < n
    assert got["user_id:token"].tolist() == expected["user_id"].tolist()
    assert got["item_id:token"].tolist() == expected["item_id"].tolist()
    assert got["rating:float"].astype(float).tolist() == expected["rating"].tolist()
    assert got["timestamp:float"].astype(float).tolist() == expected["timestamp"].astype(float).tolist()
    assert report.peak_mb > 0 and "peak memory:" in str(report)


def test_streaming_holds_an_interaction_in_tens_of_bytes(tmp_path):
    """The raw file is never held: 200,000 rating lines cost < 40 bytes each while read (a list of
    parsed tuples of strings, the previous reader, costs ~250)."""
    lines = [f"{u % 3000}::{(u * 7919) % 4000}::{1 + u % 5}::{978300000 + u}" for u in range(200_000)]
    path = tmp_path / "ratings.dat"
    path.write_text("\n".join(lines) + "\n")
    tracemalloc.start()
    log = _ratings(path, "::", "latin-1", Problems())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(log) == 200_000
    assert peak / len(log) < 40, f"{peak / len(log):.0f} bytes per interaction"


def test_amazon_metadata_of_unreviewed_items_is_skipped_whatever_the_order(tmp_path):
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps({"parent_asin": f"P{i}", "title": f"Lamp {i}"}) + "\n" for i in range(5)))
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text(
        json.dumps({"user_id": "U1", "parent_asin": "P1", "rating": 4, "timestamp": 1600000000000}) + "\n"
        + json.dumps({"user_id": "U1", "parent_asin": "P3", "rating": 5, "timestamp": 1600000001000}) + "\n"
    )  # fmt: skip
    report = convert("amazon", [str(meta), str(reviews)], str(tmp_path / "out" / "home"))  # metadata given first
    items = read_atomic(tmp_path / "out" / "home" / "home.item")
    assert items["item_id:token"].tolist() == ["P1", "P3"] and items["title:token_seq"].tolist() == ["Lamp 1", "Lamp 3"]
    assert "metadata of 3 items without reviews skipped" in report.steps


def test_clean_text():
    assert clean_text("A&amp;B\tC\r\nD\x00E") == "A&B C D E"
    assert clean_text(None) == ""


def test_converted_dataset_runs_llmgen(tmp_path, tiny_llm_path, cache_dir):
    raw = write_ml100k(tmp_path / "raw", users=8, items=10)
    convert("movielens", [str(raw)], str(tmp_path / "datasets" / "mlsmall"))
    from recbole_llmgen import run_recbole

    config = {"data_path": str(tmp_path / "datasets"), "llm_path": tiny_llm_path, "num_candidates": 3,
              "show_progress": False, "state": "ERROR", "checkpoint_dir": str(tmp_path / "saved")}  # fmt: skip
    result = run_recbole(model="LLMGen", dataset="mlsmall", config_dict=config)
    from conftest import hand_metrics
    from recbole.quick_start import load_data_and_model

    (saved,) = (tmp_path / "saved").glob("LLMGen-*.pth")
    _, model, dataset, _, _, test_data = load_data_and_model(str(saved))
    assert dataset.item_num == 10 + 1 and {k: result["test_result"][k] for k in ("ndcg@10", "hit@10")} == hand_metrics(
        model, test_data
    )  # the converted titles reach the LLM: its metrics are those of its own scores


def test_cli_convert(tmp_path, capsys):
    from recbole_llmgen.cli import main

    raw = write_ml100k(tmp_path / "raw")
    assert (
        main(
            [
                "convert",
                "movielens",
                "--input",
                str(raw),
                "--output",
                str(tmp_path / "o" / "d"),
                "--min-user-inter",
                "2",
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    assert main(["convert", "movielens", "--input", str(raw), "--output", str(tmp_path / "o" / "d")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_bad_encoding_is_reported(tmp_path):
    latest = tmp_path / "ml-latest"
    latest.mkdir()
    (latest / "ratings.csv").write_bytes(
        b"userId,movieId,rating,timestamp\n1,11,4.5,964982703\n2,1\xff1,3.0,964981247\n"
    )
    report = convert("movielens", [str(latest)], str(tmp_path / "out" / "enc"))
    assert report.problems.counts == {"bad encoding": 1}
    assert "ratings.csv:3" in report.problems.summary()
    assert report.interactions == 1
