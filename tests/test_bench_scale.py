"""benchmarks/bench_scale.py's synthetic data has the shape it claims, and the slopes are right."""

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_scale  # noqa: E402

from recbole_llmgen.convert import FilterOptions, convert  # noqa: E402


def test_synthetic_dump_has_the_shape_of_a_real_one(tmp_path):
    stats = bench_scale.generate(tmp_path / "raw", 30_000)
    report = convert("movielens", [str(tmp_path / "raw")], str(tmp_path / "synth"),
                     filters=FilterOptions(min_user_inter=5, min_item_inter=5))  # fmt: skip
    assert report.problems.total == 0
    assert abs(stats["raw_interactions"] - 30_000) / 30_000 < 0.05  # the size asked for
    inter = pd.read_csv(tmp_path / "synth" / "synth.inter", sep="\t", dtype=str)
    items = pd.read_csv(tmp_path / "synth" / "synth.item", sep="\t", dtype=str, keep_default_na=False)
    assert not inter.duplicated(["user_id:token", "item_id:token"]).any()
    counts = inter["user_id:token"].value_counts()
    assert counts.min() >= 20 - 5 and counts.max() > 5 * counts.median()  # heavy-tailed activity
    popularity = inter["item_id:token"].value_counts().to_numpy()
    assert popularity[: len(popularity) // 10].sum() > 0.3 * popularity.sum()  # a popular head
    # sessions: a user's consecutive items share a genre far more often than chance (1/16)
    genre = dict(zip(items["item_id:token"], items["genre:token_seq"].str.split().str[0]))
    same = [genre[a] == genre[b] for _, rows in inter.groupby("user_id:token", sort=False)
            for a, b in zip(rows["item_id:token"], rows["item_id:token"][1:])]  # fmt: skip
    assert np.mean(same) > 0.5
    words = items["title:token_seq"].str.split().str.len()
    assert words.between(2, 5).all() and items["year:token"].str.fullmatch(r"\d{4}").all()
    assert Counter(items["title:token_seq"]).most_common(1)[0][1] <= 3  # titles tell items apart


def test_slopes_are_the_exponent_of_seconds_against_size():
    rows = [{"interactions": n, "convert_s": 2e-6 * n, "llmgen_eval_s": 80.0 + 0 * n, "bpr_s": 1e-9 * n**1.5}
            for n in (10**5, 10**6, 10**7)]  # fmt: skip
    fitted = bench_scale.slopes(rows)
    assert fitted["convert"] == pytest.approx(1.0) and fitted["bpr"] == pytest.approx(1.5)
    assert fitted["llmgen_eval"] == pytest.approx(0.0, abs=1e-6) and "build" not in fitted


def test_a_stage_run_again_replaces_only_its_own_figures():
    kept = [{"size": 100, "convert_s": 1.0, "llmgen_eval_s": 9.0, "llmgen_eval_error": "killed"},
            {"size": 1000, "convert_s": 8.0}]  # fmt: skip
    row = bench_scale.merged(kept, {"size": 100, "machine": "m", "llmgen_eval_s": 5.0, "llmgen_eval_users_slope": 1.0},
                             ["llmgen_eval"])  # fmt: skip
    assert row == {"size": 100, "convert_s": 1.0, "machine": "m", "llmgen_eval_s": 5.0, "llmgen_eval_users_slope": 1.0}
    assert bench_scale.merged(kept, {"size": 10, "convert_s": 0.1}, ["convert"]) == {"size": 10, "convert_s": 0.1}
