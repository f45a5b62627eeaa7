"""Converters on small raw files written here: malformed lines, latin-1, tabs, gzip, k-core."""

import gzip
import json

import pandas as pd
import pytest

from recbole_llmgen.convert import ConversionError, CsvOptions, FilterOptions, convert
from recbole_llmgen.convert.common import clean_text, k_core


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


def test_k_core_reaches_a_fixed_point():
    rows = [("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "a"), ("u2", "b"), ("u3", "a"), ("u3", "d"), ("u4", "e")]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id"])
    out, rounds = k_core(inter, 2, 2)
    assert rounds >= 1
    assert (out["user_id"].value_counts() >= 2).all() and (out["item_id"].value_counts() >= 2).all()
    assert k_core(out, 2, 2)[1] == 0  # nothing more to remove
    # u3 loses d (1 interaction), then has only one item left and goes too: a second round
    assert set(out["user_id"]) == {"u1", "u2"} and set(out["item_id"]) == {"a", "b"} and rounds == 2


def test_clean_text():
    assert clean_text("A&amp;B\tC\r\nD\x00E") == "A&B C D E"
    assert clean_text(None) == ""


def test_converted_dataset_runs_llmgen(tmp_path, tiny_llm_path, cache_dir):
    raw = write_ml100k(tmp_path / "raw", users=8, items=10)
    convert("movielens", [str(raw)], str(tmp_path / "datasets" / "mlsmall"))
    from recbole_llmgen import run_recbole

    config = {"data_path": str(tmp_path / "datasets"), "llm_path": tiny_llm_path, "num_candidates": 3,
              "show_progress": False, "state": "ERROR"}  # fmt: skip
    result = run_recbole(model="LLMGen", dataset="mlsmall", config_dict=config, saved=False)
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0


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
