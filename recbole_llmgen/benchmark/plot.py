"""``benchmark.png`` (quality and cost per row) and ``learning_curve.png`` (LLMGen's valid curve)."""

from __future__ import annotations

import textwrap

from recbole_llmgen.benchmark.table import row_label


def short_label(row: dict) -> str:
    """A row's name for a plot axis: the model, and for LLMGen what tells its rows apart (gen:
    generates from the catalogue; ft: fine-tuned; fused / LLM only)."""
    if row["model"] != "LLMGen":
        return row["model"]
    notes = ["gen" if row.get("score_method") == "generate" else "rerank"]
    if (row.get("trainable_parameters") or 0) > 0:
        notes.append("ft")
    if row.get("variant"):
        notes.append(row["variant"])
    return f"LLMGen ({', '.join(notes)})"


def plot(rows: list[dict], path: str, meta: dict) -> None:
    """Quality (test NDCG@10, Hit@10) and cost (seconds, peak memory) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [short_label(r) for r in rows]  # short names on the axis; the table has the detail
    ok = [r.get("status") == "ok" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 6), gridspec_kw={"width_ratios": [2, 1, 1]})
    positions = range(len(rows))
    width = 0.4
    for shift, metric in ((-width / 2, "test_ndcg@10"), (width / 2, "test_hit@10")):
        values = [r.get(metric) or 0.0 for r in rows]
        errors = [
            [max(0.0, v - r.get(f"{metric}_low", v)) for v, r in zip(values, rows)],
            [max(0.0, r.get(f"{metric}_high", v) - v) for v, r in zip(values, rows)],
        ]  # 95% bootstrap intervals (0 where a row has none)
        bars = axes[0].bar(
            [p + shift for p in positions], values, width, yerr=errors, capsize=3, label=metric.replace("test_", "")
        )
        axes[0].bar_label(bars, fmt="%.3f", fontsize=7)
    rule = f", seen items {meta['seen_items']}" if meta.get("seen_items") else ""
    axes[0].set_title(f"Quality (test, {meta['protocol']}{rule}; 95% intervals)")
    axes[0].legend()
    seconds = [(r.get("train_seconds") or 0.0) + (r.get("eval_seconds") or 0.0) for r in rows]
    bars = axes[1].bar(positions, seconds, color="tab:orange")
    axes[1].bar_label(bars, fmt="%.0f s", fontsize=7)
    axes[1].set_title("Cost: train + test seconds")
    memory = [r.get("peak_memory_mb") or 0.0 for r in rows]
    bars = axes[2].bar(positions, memory, color="tab:green")
    axes[2].bar_label(bars, fmt="%.0f MB", fontsize=7)
    axes[2].set_title("Cost: peak memory (MB)")
    for ax in axes:
        ax.set_xticks(list(positions))
        ax.set_xticklabels(
            [lab if good else f"{lab} (failed)" for lab, good in zip(labels, ok)],
            rotation=35,
            ha="right",
            fontsize=8,
        )
    fig.suptitle(f"recbole-llmgen benchmark: {meta['dataset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(rows: list[dict], path: str) -> None:
    """Valid metric per epoch of every LLMGen row that validated after training (fused and LLM
    alone), the kept epoch marked; nothing when no row has such a curve."""
    curves = [r for r in rows if r.get("model") == "LLMGen" and r.get("epochs_trained") and r.get("valid_curve")]
    if not curves:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    metric = "valid " + str(curves[0].get("valid_metric", ""))
    for row in curves:
        points = row["valid_curve"]
        epochs = [p["epoch"] + 1 for p in points]  # RecBole counts epochs from 0
        if all(p.get("fused_ndcg@10") is not None for p in points):
            metric = "valid NDCG@10"
            fused = [p["fused_ndcg@10"] for p in points]
            ax.plot(epochs, fused, marker="o", label="LLMGen fused (LLM weight chosen on valid each epoch)")
            for x, y, p in zip(epochs, fused, points):
                ax.annotate(f"w={p['fusion_weight']}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7)
            ax.plot(
                epochs, [p["llm_alone_ndcg@10"] for p in points], marker="s", linestyle="--", label="LLMGen, LLM alone"
            )
        else:
            ax.plot(epochs, [p["valid"] for p in points], marker="o", label=textwrap.shorten(row_label(row), 48))
        if row.get("best_epoch") is not None:
            ax.axvline(row["best_epoch"] + 1, color="grey", linestyle=":", label=f"kept: epoch {row['best_epoch'] + 1}")
    if metric == "valid NDCG@10":  # the other rows, for scale
        for other in rows:
            if other.get("model") != "LLMGen" and other.get("valid_ndcg@10") is not None:
                ax.axhline(other["valid_ndcg@10"], linewidth=0.8, alpha=0.6, color="black", linestyle="-.")
                ax.annotate(other["model"], (1, other["valid_ndcg@10"]), fontsize=7, xytext=(0, 2),
                            textcoords="offset points")  # fmt: skip
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title("LLMGen learning curve (valid split)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
