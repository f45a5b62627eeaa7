"""``recbole-llmgen benchmark --sweep KEY=V1,V2,...``: one benchmark per value of a data regime option.

Each value is a cell: a plain benchmark run (:func:`recbole_llmgen.benchmark.run_benchmark`) with
that option, in its own folder ``OUT/KEY=VALUE`` (its table, plot, runs and reuse of finished
models are the benchmark's own, so a cell's numbers are those of a single run with the same
options, and a rerun reuses finished cells). Every cell's regime is checked before any model runs.
Writes ``OUT/sweep.csv`` (one row per cell and model), ``OUT/sweep.md`` and ``OUT/sweep.png`` (test
NDCG@10 against the value, one line per model, with its 95% band, the table beside it).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from recbole_llmgen.regime import REGIME_KEYS, Regime, check_regime

SWEEP_METRIC = "ndcg@10"


def parse_sweep(text: str) -> tuple[str, list]:
    """``"train_fraction=0.02,0.05"`` -> ``("train_fraction", [0.02, 0.05])``; named errors."""
    key, sep, values = (text or "").partition("=")
    key = key.strip()
    if not sep or key not in REGIME_KEYS:
        raise ValueError(
            f"sweep: {text!r} is not KEY=V1,V2,... over a benchmark option; KEY is one of {', '.join(REGIME_KEYS)}"
        )
    cast = float if key == "train_fraction" else int
    parsed = []
    for value in values.split(","):
        try:
            parsed.append(cast(value.strip()))
        except ValueError:
            kind = "a number" if cast is float else "an integer"
            raise ValueError(f"sweep: {key} value {value.strip()!r} is not {kind}") from None
    if not parsed or len(set(parsed)) != len(parsed):
        raise ValueError(f"sweep: {key} needs distinct values, got {values!r}")
    return key, parsed


def cell_name(key: str, value) -> str:
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def run_sweep(
    key: str,
    values: list,
    dataset: str = "ml-100k",
    models=None,
    protocol: str = "full",
    config_files: list[str] | None = None,
    overrides: dict | None = None,
    out: str = "results/sweep",
    log: Callable[[str], None] = print,
    runner: Callable | None = None,
    base: dict | None = None,
    **benchmark_options,
) -> list[dict]:
    """Run the benchmark once per value of ``key`` (a regime option; the other options from ``base``)."""
    from recbole_llmgen import benchmark

    if key not in REGIME_KEYS:
        raise ValueError(f"sweep: {key!r} is not a benchmark option to sweep; choose one of {', '.join(REGIME_KEYS)}")
    base = {k: v for k, v in (base or {}).items() if v is not None and k != key}
    regimes = [check_regime(**{**base, key: value}) for value in values]
    overrides = dict(overrides or {})
    eval_users = benchmark_options.get("eval_users", overrides.get("eval_users"))
    for value, regime in zip(values, regimes):  # a regime (or sample) that evaluates nobody fails before any model runs
        _, users = benchmark.regime_data(
            regime, dataset, overrides, config_files, os.path.join(out, cell_name(key, value))
        )
        if eval_users is not None:
            benchmark.sample_users(
                users, eval_users, int(overrides.get("seed", benchmark.DEFAULT_SEED)), lambda _: None
            )
    runner = runner or benchmark.run_in_subprocess
    models = list(models or benchmark.DEFAULT_MODELS)
    rows: list[dict] = []
    for index, (value, regime) in enumerate(zip(values, regimes), 1):
        cell = os.path.join(out, cell_name(key, value))
        log(f"cell {index} of {len(values)}: {cell_name(key, value)} ({regime.describe()}) -> {cell}")
        cell_rows = benchmark.run_benchmark(
            dataset, models, protocol, config_files, overrides, cell, lambda m: log("  " + m), runner,
            regime=regime, **benchmark_options,
        )  # fmt: skip
        rows.extend({"sweep_key": key, "sweep_value": value, "row": benchmark.row_name(r), **r} for r in cell_rows)
    write_sweep(rows, key, values, out, {"dataset": dataset, "protocol": protocol, "base": Regime(**base)})
    return rows


def write_sweep(rows: list[dict], key: str, values: list, out: str, meta: dict) -> None:
    import pandas as pd

    from recbole_llmgen.benchmark import row_label

    frame = pd.DataFrame([{"label": row_label(r), **r} for r in rows])
    frame.to_csv(os.path.join(out, "sweep.csv"), index=False)
    with open(os.path.join(out, "sweep.md"), "w", encoding="utf-8") as f:
        f.write(sweep_table(rows, key, values, meta))
    sweep_plot(rows, key, values, os.path.join(out, "sweep.png"), meta)


def _names(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["row"] for r in rows))


def _first(rows: list[dict], value, field: str) -> dict | None:
    """The first row of the cell ``value`` that has ``field`` set (users and history are the same for
    every row of a cell; LLMGen's row is the one with a candidate source)."""
    return next((r for r in rows if r["sweep_value"] == value and r.get(field) not in (None, "")), None)


def _cell(rows: list[dict], name: str, value) -> dict | None:
    return next((r for r in rows if r["row"] == name and r["sweep_value"] == value), None)


def _value_text(row: dict | None, metric: str = SWEEP_METRIC) -> str:
    if row is None:
        return "-"
    if row.get("status") != "ok" or row.get(f"test_{metric}") is None:
        return "failed"
    low, high = row.get(f"test_{metric}_low"), row.get(f"test_{metric}_high")
    band = f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
    return f"{row[f'test_{metric}']:.4f}{band}"


def sweep_table(rows: list[dict], key: str, values: list, meta: dict) -> str:
    """Models down, values across: test NDCG@10 [95% CI], then users, history and LLMGen's candidates."""
    head = (
        f"Dataset {meta['dataset']}, protocol {meta['protocol']}, test NDCG@10 [95% bootstrap interval over "
        f"users] per {key}; every cell is a full benchmark run (its folder holds its own table). Other regime "
        f"options: {meta['base'].describe()}.\n\n"
        f"| model | {' | '.join(f'{key} {v:g}' if isinstance(v, float) else f'{key} {v}' for v in values)} |\n"
        f"|---|{'---|' * len(values)}\n"
    )
    lines = [f"| {name} | {' | '.join(_value_text(_cell(rows, name, v)) for v in values)} |" for name in _names(rows)]

    def per_value(field, fmt):
        cells = []
        for v in values:
            row = _first(rows, v, field)
            cells.append("-" if row is None else fmt(row[field]))
        return " | ".join(cells)

    lines.append(f"| users evaluated | {per_value('users', str)} |")
    lines.append(f"| average training history | {per_value('avg_train_items', lambda x: f'{x:.1f}')} |")
    sources = []
    for v in values:
        row = _first(rows, v, "candidate_source")
        sources.append(os.path.basename(str(row["candidate_source"])).split("-")[0] if row else "-")
    if any(s != "-" for s in sources):
        lines.append(f"| LLMGen reranks | {' | '.join(sources)} |")
    return head + "\n".join(lines) + "\n"


def sweep_plot(rows: list[dict], key: str, values: list, path: str, meta: dict) -> None:
    """Test NDCG@10 against the value (one line per model, 95% band), the table beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, side) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 2]})
    for name in _names(rows):
        points = [(v, _cell(rows, name, v)) for v in values]
        points = [(v, r) for v, r in points if r is not None and r.get("status") == "ok"]
        if not points:
            continue
        xs = [v for v, _ in points]
        ys = [r[f"test_{SWEEP_METRIC}"] for _, r in points]
        line = ax.plot(xs, ys, marker="o", label=name)[0]
        lows = [r.get(f"test_{SWEEP_METRIC}_low", y) for (_, r), y in zip(points, ys)]
        highs = [r.get(f"test_{SWEEP_METRIC}_high", y) for (_, r), y in zip(points, ys)]
        ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.12)
    if all(v > 0 for v in values) and max(values) / min(values) >= 10:
        ax.set_xscale("log")
    ax.set_xticks(values)
    ax.set_xticklabels([f"{v:g}" for v in values])
    ax.set_xlabel(key)
    ax.set_ylabel("test NDCG@10")
    ax.set_title(f"{meta['dataset']}, {meta['protocol']} ranking: test NDCG@10 (95% bands)")
    ax.legend(fontsize=8)
    side.axis("off")
    names = _names(rows)
    cells = [[_value_text(_cell(rows, n, v)).split(" [")[0] for v in values] for n in names]
    extra = []
    for field, fmt in (("users", str), ("avg_train_items", lambda x: f"{x:.1f}")):
        found = [_first(rows, v, field) for v in values]
        extra.append(["-" if r is None else fmt(r[field]) for r in found])
    table = side.table(
        cellText=cells + extra,
        rowLabels=names + ["users", "avg history"],
        colLabels=[f"{v:g}" for v in values],
        loc="center",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.4)
    side.set_title(f"test NDCG@10 by {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
